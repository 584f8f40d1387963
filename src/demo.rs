//! `cnse-dp demo` (written once the server lands on main).

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`demo` is not available in this build")
}

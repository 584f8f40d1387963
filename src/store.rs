//! `cnse-dp store` (in progress on its branch).

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`store` is not available in this build")
}

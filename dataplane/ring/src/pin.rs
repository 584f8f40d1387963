//! Core pinning for thread-per-core loops.

use std::io;

/// Pins the calling thread to the `index`-th CPU (round robin) of the CPUs
/// it may run on; returns that CPU.
pub fn pin_current_thread(index: usize) -> io::Result<usize> {
    let cpus = allowed_cpus()?;
    if cpus.is_empty() {
        return Err(io::Error::new(io::ErrorKind::NotFound, "no CPU in the affinity mask"));
    }
    let cpu = cpus[index % cpus.len()];
    pin_current_thread_to(cpu)?;
    Ok(cpu)
}

/// Pins the calling thread to CPU `cpu`.
pub fn pin_current_thread_to(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("CPU {cpu} out of range"),
        ));
    }
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it (cpu is in
    // range, checked above); sched_setaffinity(0) only reads it for the
    // calling thread.
    let rc = unsafe {
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut one);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The CPUs the calling thread may run on, ascending.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it and
    // CPU_ISSET only reads inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect())
    }
}

//! Starting and stopping the processes of the test cluster.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// `program args`, with no input and its output into the file `log`.
pub(crate) fn launch(program: &Path, args: Vec<String>, log: &Path) -> anyhow::Result<Command> {
    let log = std::fs::File::create(log)?;
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    Ok(command)
}

/// Starts the commands from a thread that lives as long as the process, each child set to
/// be killed when that thread's process dies (`PR_SET_PDEATHSIG` fires when the spawning
/// *thread* exits, so a short-lived test thread must not be the one that spawns).
pub(crate) fn spawn_supervised(commands: Vec<Command>) -> anyhow::Result<Vec<u32>> {
    static SUPERVISOR: OnceLock<Mutex<std::sync::mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    type SpawnRequest = (
        Vec<Command>,
        std::sync::mpsc::Sender<std::io::Result<Vec<u32>>>,
    );
    let sender = SUPERVISOR.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("testenv-supervisor".into())
            .spawn(move || {
                let mut children: Vec<Child> = Vec::new();
                for (commands, reply) in rx {
                    let mut pids = Vec::new();
                    let mut result = Ok(());
                    for mut command in commands {
                        set_parent_death_signal(&mut command);
                        match command.spawn() {
                            Ok(child) => {
                                pids.push(child.id());
                                children.push(child);
                            }
                            Err(e) => {
                                result = Err(e);
                                break;
                            }
                        }
                    }
                    let _ = reply.send(result.map(|()| pids));
                    // Reap children that exited so they do not linger as zombies.
                    children.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
                }
            })
            .expect("start the testenv supervisor thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = std::sync::mpsc::channel();
    sender
        .lock()
        .map_err(|_| anyhow::anyhow!("supervisor lock poisoned"))?
        .send((commands, reply_tx))
        .context("supervisor thread is gone")?;
    Ok(reply_rx.recv().context("supervisor thread is gone")??)
}

fn set_parent_death_signal(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches only the child's own state.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

pub(crate) fn stop_processes(pids: &[u32]) {
    // Reverse order: the controller manager and API server before etcd.
    for pid in pids.iter().rev() {
        // SAFETY: kill(2) on a PID this harness started.
        unsafe {
            libc::kill(*pid as libc::pid_t, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| process_alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in pids {
        if process_alive(*pid) {
            // SAFETY: as above.
            unsafe {
                libc::kill(*pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
}

pub(crate) fn process_alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped by the supervisor) counts as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

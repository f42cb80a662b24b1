//! The `vigil` binary: one static executable, one subcommand per role.

use std::ffi::OsString;
use std::process::ExitCode;

/// A subcommand: its name, a one-line summary for `--help`, and its entry point, which
/// receives the arguments after the subcommand's name.
struct Command {
    name: &'static str,
    summary: &'static str,
    run: fn(Vec<OsString>) -> ExitCode,
}

const COMMANDS: &[Command] = &[
    Command {
        name: "demo",
        summary: "a local 3-host cluster loses a host; watch its VM come back (timeline in ms)",
        run: vigil::demo::main,
    },
    Command {
        name: "agent",
        summary: "run the agent: Raft node, peer transport, control socket (--config FILE)",
        run: vigil::node::main,
    },
    Command {
        name: "ctl",
        summary: "talk to an agent's control socket: status, stepdown, kv, events, metrics",
        run: vigil::control::ctl::main,
    },
    Command {
        name: "sim",
        summary: "deterministic Raft simulation with faults and safety checks",
        run: vigil::sim::cli::main,
    },
    Command {
        name: "sweep-snapshots",
        summary: "remove a VM's superseded (or, once deleted, all) snapshot directories (the agent runs it)",
        run: vigil::node::sweep::main,
    },
    Command {
        name: "vmm",
        summary: "run one VM (built-in guest or a restored snapshot) with its control socket and lease watchdog",
        run: vmm,
    },
    Command {
        name: "keygen",
        summary: "write a new cluster key file (32 random bytes, mode 0600)",
        run: keygen,
    },
];

const KEYGEN_USAGE: &str = "\
Usage: vigil keygen [--force] PATH

Writes a new cluster key (32 bytes from getrandom) to PATH with mode 0600 and prints
its key id. Every member of a cluster needs the same key file.

Options:
  --force     replace an existing file at PATH (the new key is written to a temporary
              file and renamed over it)
  -h, --help  print this help
";

/// `vigil keygen [--force] PATH`: writes a fresh cluster key file.
fn keygen(args: Vec<OsString>) -> ExitCode {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mut force = false;
    let mut path: Option<std::path::PathBuf> = None;
    loop {
        let arg = match parser.next() {
            Ok(Some(arg)) => arg,
            Ok(None) => break,
            Err(e) => {
                eprintln!("vigil keygen: {e}\n\n{KEYGEN_USAGE}");
                return ExitCode::from(2);
            }
        };
        match arg {
            Long("force") => force = true,
            Short('h') | Long("help") => {
                print!("{KEYGEN_USAGE}");
                return ExitCode::SUCCESS;
            }
            Value(value) if path.is_none() => path = Some(value.into()),
            other => {
                eprintln!("vigil keygen: {}\n\n{KEYGEN_USAGE}", other.unexpected());
                return ExitCode::from(2);
            }
        }
    }
    let Some(path) = path else {
        eprintln!("vigil keygen: PATH is missing\n\n{KEYGEN_USAGE}");
        return ExitCode::from(2);
    };
    let key = match vigil::auth::ClusterKey::generate() {
        Ok(key) => key,
        Err(e) => {
            eprintln!("vigil keygen: cannot read random bytes (getrandom): {e}");
            return ExitCode::FAILURE;
        }
    };
    match vigil::auth::write_key_file(&path, &key, force) {
        Ok(()) => {
            println!("wrote cluster key {} to {}", key.id(), path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vigil keygen: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `vigil vmm`: the per-VM process; the logic lives in vigil-kvm, the bounds here.
fn vmm(args: Vec<OsString>) -> ExitCode {
    use vigil::limits;
    let bounds = vigil_kvm::vmm::VmmLimits {
        max_frame_bytes: limits::MAX_VMM_CONTROL_FRAME_BYTES,
        max_connections: limits::MAX_VMM_CONTROL_CONNECTIONS,
        min_memory_bytes: limits::MIN_GUEST_MEMORY_BYTES,
        max_memory_bytes: limits::MAX_GUEST_MEMORY_BYTES,
        max_vcpus: limits::MAX_VCPUS,
    };
    vigil_kvm::vmm::main(args, &bounds)
}

fn usage() -> String {
    let mut text = String::from(
        "vigil: keeps microVMs alive when bare-metal hosts die\n\n\
         Usage: vigil <COMMAND> [ARGS...]\n       vigil --help | --version\n\nCommands:\n",
    );
    for command in COMMANDS {
        text.push_str(&format!("  {:<10} {}\n", command.name, command.summary));
    }
    text.push_str("\n`vigil <COMMAND> --help` describes each command.\n");
    text
}

fn main() -> ExitCode {
    vigil::logging::init();
    let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let Some(first) = args.first().cloned() else {
        eprint!("{}", usage());
        return ExitCode::from(2);
    };
    match first.to_str() {
        Some("-h" | "--help" | "help") => {
            print!("{}", usage());
            ExitCode::SUCCESS
        }
        Some("-V" | "--version") => {
            println!("vigil {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some(name) => match COMMANDS.iter().find(|c| c.name == name) {
            Some(command) => {
                args.remove(0);
                (command.run)(args)
            }
            None => {
                eprintln!("vigil: unknown command '{name}'\n");
                eprint!("{}", usage());
                ExitCode::from(2)
            }
        },
        None => {
            eprintln!("vigil: the command name is not valid UTF-8");
            ExitCode::from(2)
        }
    }
}

//! ftvm: the command-line front of the fault-tolerant virtual machine monitor.
//! Each subcommand lives in its own module; this file only dispatches.

mod accept;
mod agent_api;
mod agent_cmd;
mod agent_console;
mod agent_rules;
mod api;
mod backup_cmd;
mod bench_cmd;
mod console_socket;
mod ctl_cmd;
mod demo;
mod demo_cluster;
mod guest_image;
mod metrics_http;
mod model_cmd;
mod netns;
mod replay_cmd;
mod replication_args;
mod resilient;
mod run_cmd;
mod snapshot_cmd;
mod vm_cmd;

use clap::{Parser, Subcommand};

/// Exit status when ftvm itself fails (as opposed to a guest command's status),
/// following the convention of container runners.
const EXIT_FTVM_ERROR: i32 = 125;

#[derive(Parser)]
#[command(name = "ftvm", version, about = "A fault-tolerant virtual machine monitor", long_about = None)]
#[command(after_help = "When ftvm itself fails it prints one line, `ftvm: error: ...`, and exits with status 125.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM: the console on the terminal, or run one command in the guest
    Run(run_cmd::RunArgs),
    /// Wait for a primary's checkpoints and take its VM over when it fails
    Backup(backup_cmd::BackupArgs),
    /// Show replication and failover live: kill a primary, watch the backup take over (root;
    /// --cluster: the many-host story with its dashboard)
    Demo(demo::DemoArgs),
    /// Talk to a running VM through its control API socket (--api)
    Ctl(ctl_cmd::CtlArgs),
    /// Replay a run recorded with `ftvm run --record`, checking every digest
    Replay(replay_cmd::ReplayArgs),
    /// Save a running VM's whole state to a file (through its --api socket)
    Snapshot(snapshot_cmd::SnapshotArgs),
    /// Continue a VM from a snapshot file
    Restore(snapshot_cmd::RestoreArgs),
    /// Reliability models of virtualized nodes: bounds, block diagrams, availability, plots
    Model(model_cmd::ModelArgs),
    /// Run this host's agent: heartbeat, replicas, the control loop, the /v1 API and dashboard
    Agent(agent_cmd::AgentArgs),
    /// Declare, list, show and delete VMs through an agent's /v1 API
    Vm(vm_cmd::VmArgs),
    /// Benchmarks that print figures (they are not tests)
    #[command(subcommand)]
    Bench(bench_cmd::BenchKind),
    /// Whether this binary reads a running --resilient VM's handover state (asked by its
    /// keeper before `ctl upgrade` re-executes it)
    #[command(hide = true)]
    HandoverCheck {
        /// The handover state's format version
        #[arg(long)]
        version: u32,
    },
}

fn dispatch(command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Run(args) => run_cmd::run(args),
        Command::Replay(args) => replay_cmd::run(args),
        Command::Ctl(args) => ctl_cmd::run(args),
        Command::Backup(args) => backup_cmd::run(args),
        Command::Snapshot(args) => snapshot_cmd::snapshot(args),
        Command::Demo(args) => demo::run(args),
        Command::Bench(kind) => bench_cmd::run(kind),
        Command::Restore(args) => snapshot_cmd::restore(args),
        Command::Model(args) => model_cmd::run(args).map(|()| 0),
        Command::Agent(args) => agent_cmd::run(args),
        Command::Vm(args) => vm_cmd::run(args),
        Command::HandoverCheck { version } => resilient::handover_check(version).map(|()| 0),
    }
}

fn main() {
    let cli = Cli::parse();
    let code = match dispatch(cli.command) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("ftvm: error: {err:#}");
            EXIT_FTVM_ERROR
        }
    };
    std::process::exit(code);
}

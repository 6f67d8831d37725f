"""``ringtrain node``: run this device's node of a job.

With a script (``ringtrain node train.py --lr 0.1``), the script runs as this device's node,
the way torchrun runs a script per machine: the ring is formed first, then the script runs in
this process with torchrun's variables describing the ring (RANK, WORLD_SIZE, LOCAL_RANK,
...), so ``init_process_group("ringtrain")`` needs no address; :func:`ringtrain.join` returns
the node.

With ``--job rl-cartpole``, the built-in reinforcement-learning job (:mod:`.rl_job`).
With no script, the node runs the built-in job: the demo's classifier on the bundled digits,
trained elastically with whoever else runs ``ringtrain node`` for the same job on the LAN.
Nodes may come and go; checkpoints go to ``--checkpoint-dir`` (default
``./ringtrain-<job>``) and a restarted job resumes from the newest one. Ctrl-C (or SIGTERM)
leaves the ring after the current step, so the others carry on without a failed step.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import runpy
import signal
import sys
import time
from pathlib import Path

from ..bench.allreduce import parse_size
from ..config import LaunchOptions
from ..config import env as env_value
from ..errors import ConfigError, RingtrainError
from ..node.launch import join, set_launched_node, torchrun_environment
from ..train.nn import accuracy
from ..train.trainer import StepReport, Trainer, schema_of, training_facts
from . import watch
from .demo import LEARNING_RATE, demo_model, epoch_printer
from .health import StateFile

RL_JOBS = ("rl-cartpole",)  # built-in reinforcement-learning jobs (ringtrain.cli.rl_job)
EXIT_LEFT = 130  # the node left the ring on Ctrl-C / SIGTERM
GLOBAL_BATCH = 64  # fixed whatever the ring size: a node joining or leaving changes no step


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the subcommand."""
    env = LaunchOptions.from_env()
    parser.add_argument("script", nargs="?", help="a Python training script to run as this "
                        "node (it calls ringtrain.join()); default: the built-in job")
    parser.add_argument("script_args", nargs=argparse.REMAINDER,
                        help="arguments for the script")
    parser.add_argument("--job", default=env.job,
                        help=f"job name: only nodes of the same job form a ring "
                             f"(default {env.job!r}, or RINGTRAIN_JOB)")
    parser.add_argument("--min-nodes", type=int, default=env.min_nodes,
                        help=f"the ring forms, and keeps training, only with at least this "
                             f"many nodes (default {env.min_nodes})")
    parser.add_argument("--max-nodes", type=int, default=env.max_nodes,
                        help=f"more nodes than this are not admitted (default {env.max_nodes})")
    parser.add_argument("--interface", default=env.interface,
                        help="network interface (name or IPv4 address) to announce and listen "
                             "on (default: every non-loopback interface)")
    parser.add_argument("--port", type=int, default=env.port,
                        help=f"TCP port to listen on, and its UDP key door (default {env.port}; "
                             f"0 picks a free one)")
    parser.add_argument("--peer", action="append", default=list(env.peers), metavar="HOST:PORT",
                        help="a peer to dial directly, where multicast does not pass "
                             "(repeatable; also RINGTRAIN_PEERS=host:port,host:port); "
                             "FINGERPRINT@IP:PORT pins the device that must answer there")
    parser.add_argument("--peers-dns", default=env.peers_dns, metavar="NAME",
                        help="a DNS name that lists the peers, looked up again every few "
                             "seconds (a Kubernetes headless Service: its A records with "
                             "--port, or SRV records for _port._tcp.NAME); needs "
                             "ringtrain[dns] (also RINGTRAIN_PEERS_DNS)")
    parser.add_argument("--no-discovery", action="store_true", default=not env.discovery,
                        help="do not use mDNS; only --peer addresses")
    parser.add_argument("--node-id", default=env.node_id,
                        help="this node's id (default: host name plus random digits)")
    parser.add_argument("--key-file", default=None,
                        help="the job key made by `ringtrain keygen` (or RINGTRAIN_KEY_FILE); "
                             "every device of the job needs the same key")
    parser.add_argument("--insecure", action="store_true", default=env.insecure,
                        help="no key, no encryption: refused unless every address is loopback")
    parser.add_argument("--probe-links", default=None, metavar="BYTES",
                        help="measure every link with this many bytes (e.g. 8M) when a ring "
                             "of three or more forms, and order the ring by the rates (links "
                             "that differ: two rooms, Wi-Fi and wired); every node must say "
                             "the same (RINGTRAIN_LINK_PROBE_BYTES)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with a script: how many nodes the first ring waits for (default "
                             "--min-nodes; the ring may then shrink to --min-nodes and grow "
                             "to --max-nodes)")
    parser.add_argument("--epochs", type=int, default=30,
                        help="built-in job: epochs to train (default 30)")
    parser.add_argument("--mode", choices=("sync", "async"), default="sync",
                        help="built-in RL jobs (--job rl-cartpole): async keeps acting while "
                             "the ring averages (default sync)")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="built-in job: where checkpoints go (default: the run folder)")
    parser.add_argument("--state-file", default=env_value("STATE_FILE"), metavar="PATH",
                        help="built-in job: keep the node's state (forming, training with "
                             "generation and step, done, left) in this JSON file, for "
                             "`ringtrain health` and readiness probes (RINGTRAIN_STATE_FILE)")
    watch.add_arguments(parser)  # observe: waiting, timeouts, run folder, status, --lr


def options_from(args: argparse.Namespace) -> LaunchOptions:
    """The launch options the flags describe."""
    if args.min_nodes < 1 or args.max_nodes < args.min_nodes:
        raise ConfigError(f"need 1 <= --min-nodes <= --max-nodes, got {args.min_nodes} and "
                          f"{args.max_nodes}")
    if args.no_discovery and not args.peer and not args.peers_dns:
        raise ConfigError("--no-discovery needs at least one --peer HOST:PORT or --peers-dns")
    return LaunchOptions(job=args.job, peers=tuple(args.peer), port=args.port,
                         interface=args.interface, min_nodes=args.min_nodes,
                         max_nodes=args.max_nodes, discovery=not args.no_discovery,
                         insecure=args.insecure, node_id=args.node_id,
                         peers_dns=args.peers_dns)


def run(args: argparse.Namespace) -> int:
    """Run the script or the built-in job as this device's node."""
    options = options_from(args)
    if args.key_file:
        os.environ["RINGTRAIN_KEY_FILE"] = args.key_file
    if args.probe_links:  # read by Settings.from_env, here and in a script we start
        os.environ["RINGTRAIN_LINK_PROBE_BYTES"] = str(parse_size(args.probe_links))
    watch.apply_timeouts(args)  # observe: --wait and the timeout flags
    if args.script:
        return _run_script(args.script, args.script_args, options, args.world_size)
    if options.job in RL_JOBS:  # imported only for them: it needs Gymnasium
        from .rl_job import run as run_rl_job

        return run_rl_job(options, args.mode)
    run_dir = Path(args.run_dir or f"ringtrain-{options.job}")
    finished = watch.finished_run(Path(args.checkpoint_dir or run_dir), args.epochs)
    if finished is not None:
        print(f"ringtrain node: {finished}", flush=True)
        return 0
    return _run_builtin_job(options, args, run_dir)


def _run_script(script: str, script_args: list[str], options: LaunchOptions,
                world_size: int | None = None) -> int:
    """Form the ring, then run the script in this process with the ring as its node and
    torchrun's variables describing it (a torchrun script runs unchanged with
    ``init_process_group("ringtrain")``)."""
    path = Path(script)
    if not path.is_file():
        raise ConfigError(f"no such script: {script}")
    os.environ.update(options.to_env())
    if importlib.util.find_spec("torch") is not None:  # before the ring forms: see there
        os.environ.update(_torch_rendezvous())
    print(f"ringtrain node: job {options.job!r}, forming the ring for {script}...", flush=True)
    node = join(options, world_size=world_size)
    os.environ.update(torchrun_environment(node))
    print(f"ringtrain node {node.node_id}: rank {node.rank} of {node.world_size} (generation "
          f"{node.generation}); running {script}", flush=True)
    set_launched_node(node)
    sys.argv[:] = [script, *script_args]
    sys.path.insert(0, str(path.resolve().parent))
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        set_launched_node(None)
        node.close()
    return 0


def _torch_rendezvous() -> dict[str, str]:
    """With PyTorch installed: import it before the ring forms (every node's script then
    reaches its first collective without the seconds of that import, which the ring would
    otherwise spend waiting, and past the progress deadline blame on the slow node), and
    serve the local store ``init_process_group``'s ``env://`` handshake connects to."""
    from ..integrations.torch.backend import serve_rendezvous_store

    return serve_rendezvous_store()


def _run_builtin_job(options: LaunchOptions, args: argparse.Namespace, run_dir: Path) -> int:
    epochs, checkpoint_dir = args.epochs, Path(args.checkpoint_dir or run_dir)
    lr = LEARNING_RATE if args.lr is None else args.lr
    if not lr > 0:
        raise ConfigError(f"--lr must be positive, got {lr}")
    train, test, model, optimizer = demo_model(seed=0, lr=lr)
    settings = {"batch_size": GLOBAL_BATCH, "seed": 0, "adaptive": True, "share_every": 10,
                "average_every": 1, "loss": "softmax_cross_entropy",
                "global_batch_size": GLOBAL_BATCH, "lr": lr}
    schema = schema_of(training_facts(model, train.x, train.y, **settings))
    print(f"ringtrain node: job {options.job!r}, looking for at least {options.min_nodes} "
          f"nodes{' by mDNS' if options.discovery else ''}"
          f"{' and at ' + ', '.join(options.peers) if options.peers else ''}"
          f"{' and in DNS name ' + options.peers_dns if options.peers_dns else ''}...",
          flush=True)
    started = time.perf_counter()
    state = StateFile(args.state_file) if args.state_file else None
    if state:
        state.write("forming", job=options.job)
    with watch.WaitReporter(options, args.diagnose_after):  # observe: who is seen, and why not
        node = join(options, schema=schema)
    with node:
        print(f"ringtrain node {node.node_id}: in a ring of {node.world_size} (generation "
              f"{node.generation}) after {time.perf_counter() - started:.1f} s; members: "
              f"{', '.join(node.members)}", flush=True)
        links = node.state()["link_rates_mbit"]
        if links:
            print(f"ringtrain node {node.node_id}: ring ordered by measured links "
                  f"(Mbit/s, from -> to): {links}", flush=True)
        observer = watch.observe(node, run_dir, args, options)  # observe: status, files
        try:
            trainer = Trainer(node, model, optimizer, train.x, train.y,
                              batch_size=GLOBAL_BATCH, global_batch_size=GLOBAL_BATCH,
                              checkpoint_dir=checkpoint_dir, checkpoint_every=50)
            leaving = _leave_on_signal(trainer)
            printer = epoch_printer(trainer, test, epochs, node.node_id)

            def on_step(report: StepReport) -> None:
                printer(report)
                score = accuracy(model.forward(test.x), test.y) if report.end_of_epoch \
                    else None
                observer.on_step(report, time.time() - report.step_seconds, score)
                if state:
                    state.write("training", throttle=True, job=options.job,
                                node=node.node_id, generation=node.generation,
                                world_size=node.world_size, members=list(node.members),
                                step=trainer.step_count)

            trainer.fit(epochs, on_step=on_step)
            saved = trainer.save_checkpoint()  # also on leaving: the model the last line names
        except RingtrainError as exc:
            path = observer.dump(f"failure: {exc}")
            print(f"ringtrain node {node.node_id}: the ring failed; flight recorder written "
                  f"to {path} (ringtrain doctor {run_dir})", file=sys.stderr, flush=True)
            raise
        finally:
            observer.close()
        if state:
            state.write("left" if leaving else "done", job=options.job, node=node.node_id,
                        step=trainer.step_count)
        print(f"ringtrain node {node.node_id}: {'left the ring' if leaving else 'done'} at "
              f"step {trainer.step_count}, model {trainer.version}, test accuracy "
              f"{accuracy(model.forward(test.x), test.y):.3f}, re-formations "
              f"{trainer.reforms}; model saved to {saved}", flush=True)
        return EXIT_LEFT if leaving else 0


def _leave_on_signal(trainer: Trainer) -> list[int]:
    """First Ctrl-C / SIGTERM: leave after the current step. Second: stop at once."""
    received: list[int] = []

    def handler(number: int, _frame: object) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(number)
        print("ringtrain node: leaving the ring after this step (again to stop at once)",
              file=sys.stderr, flush=True)
        trainer.request_leave()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)
    return received

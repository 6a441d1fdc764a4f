"""detectron2's command line and launcher for the detection entry point: ``default_argument_parser``
(--config-file, --resume, --eval-only, --num-gpus, --num-machines, --machine-rank, --dist-url and
trailing KEY VALUE overrides) and ``launch``, which starts one process per GPU on this machine and
joins them (and other machines') into one torch.distributed group. Processes started by torchrun
are used as they are. Without CUDA, ``--num-gpus N`` starts N CPU processes (gloo)."""
from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Callable
from urllib.parse import urlparse

from sgdet.errors import ArgumentParser, ConfigError, SGError


def default_argument_parser(prog: str = "train_net.py") -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train or evaluate Faster R-CNN with a compressed (SG) backbone.",
        epilog="examples:\n"
               "  train_net.py --config-file configs/faster_rcnn_sg_r50.yaml MODEL.WEIGHTS r50_g60.sg.pt\n"
               "  train_net.py --config-file configs/faster_rcnn_sg_r50.yaml --num-gpus 8\n"
               "  train_net.py --config-file configs/faster_rcnn_sg_r50.yaml --eval-only "
               "MODEL.WEIGHTS out/model_final.pth\n"
               "  train_net.py --config-file ... --resume     # continue OUTPUT_DIR/last_checkpoint.pt")
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUTPUT_DIR/last_checkpoint.pt (start fresh if there is none)")
    parser.add_argument("--eval-only", action="store_true",
                        help="evaluate MODEL.WEIGHTS at every INPUT.MIN_SIZE_TEST, no training")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per machine")
    parser.add_argument("--num-machines", type=int, default=1, help="total number of machines")
    parser.add_argument("--machine-rank", type=int, default=0,
                        help="the rank of this machine (unique per machine)")
    parser.add_argument("--dist-url", default="auto",
                        help="tcp://HOST:PORT of machine 0 for multi-machine runs "
                             "('auto': a free local port, one machine only)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides, e.g. SOLVER.BASE_LR 0.02 OUTPUT_DIR out/run1")
    return parser


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _address(dist_url: str, num_machines: int) -> tuple[str, int]:
    if dist_url == "auto":
        if num_machines != 1:
            raise ConfigError("--dist-url auto works on one machine only; give tcp://HOST:PORT of machine 0")
        return "127.0.0.1", _free_port()
    parsed = urlparse(dist_url)
    if parsed.scheme != "tcp" or not parsed.hostname or not parsed.port:
        raise ConfigError(f"--dist-url must be tcp://HOST:PORT or auto, got {dist_url!r}")
    return parsed.hostname, parsed.port


def _worker(local_rank: int, main: Callable, world: int, per_machine: int, machine_rank: int,
            host: str, port: int, args) -> None:
    os.environ.update(RANK=str(machine_rank * per_machine + local_rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(per_machine),
                      MASTER_ADDR=host, MASTER_PORT=str(port))
    try:
        main(args)
    except SGError as exc:          # one line per failing process, then a non-zero exit
        print(f"error (rank {os.environ['RANK']}): {exc}", file=sys.stderr)
        sys.exit(2)


def launch(main: Callable, num_gpus_per_machine: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str = "auto", args=()) -> None:
    """Run ``main(args)`` in ``num_gpus_per_machine`` processes on each of ``num_machines``
    machines (this one being ``machine_rank``), or once in this process when the world is one
    process or torchrun already started us."""
    for value, flag, low in ((num_gpus_per_machine, "--num-gpus", 1), (num_machines, "--num-machines", 1),
                             (machine_rank, "--machine-rank", 0)):
        if value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    if machine_rank >= num_machines:
        raise ConfigError(f"--machine-rank {machine_rank} must be below --num-machines {num_machines}")
    world = num_gpus_per_machine * num_machines
    if world == 1 or all(k in os.environ for k in ("RANK", "WORLD_SIZE")):
        main(args)
        return
    import torch
    import torch.multiprocessing as mp
    if torch.cuda.is_available() and torch.cuda.device_count() < num_gpus_per_machine:
        raise ConfigError(f"--num-gpus {num_gpus_per_machine} but this machine has "
                          f"{torch.cuda.device_count()} GPU(s)")
    host, port = _address(dist_url, num_machines)
    try:
        mp.start_processes(_worker, nprocs=num_gpus_per_machine, start_method="spawn",
                           args=(main, world, num_gpus_per_machine, machine_rank, host, port, args))
    except mp.ProcessExitedException as exc:
        raise SGError(f"process {exc.error_index} of {num_gpus_per_machine} exited with status "
                      f"{exc.exit_code} (its error is printed above)") from None
    except mp.ProcessRaisedException as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise SGError(f"a training process failed: {last}") from None

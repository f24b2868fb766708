"""`lva rpc-server`: lend this machine's devices to lva (or llama.cpp) on another machine, over ggml's RPC.

The same server llama.cpp's `rpc-server` runs, from the same build of ggml, so a client of this
llama-cpp-python version speaks its protocol. ggml's server loop blocks in C; it runs in a thread so
Ctrl+C still stops the process.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

from assistant.commands import common


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "rpc-server", help="lend this machine's GPU (or CPU) to lva on another machine (ggml RPC)",
        description="Serve this machine's devices with ggml's RPC protocol, for `--rpc HOST:PORT` on another "
                    "machine. The protocol has no authentication or encryption: anyone who reaches the port can "
                    "use the device and read its memory, so it listens on 127.0.0.1 unless --host says otherwise. "
                    "Example (on the GPU desktop): lva rpc-server --host 192.168.1.20")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=50052, help="port (default 50052)")
    parser.add_argument("--device", metavar="NAME[,NAME]",
                        help="devices to lend, by ggml name as `lva info` lists them "
                             "(default: every GPU, else the CPU)")
    parser.add_argument("--threads", type=int, help="CPU threads, when the CPU is lent (default: all cores)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from models import rpc

    rpc.require()
    names = [n.strip() for n in (args.device or "").split(",") if n.strip()]
    host, port = rpc.parse_endpoint(f"{args.host}:{args.port}")
    devices = rpc.devices_to_serve(names)
    if not common.is_loopback(host):
        print(f"lva: WARNING: listening on {host}, not the loopback: ggml's RPC protocol has no authentication or "
              f"encryption; anyone who reaches port {port} can run code on {', '.join(d.name for d in devices)} "
              f"and read its memory. Use it only on a network you trust.", file=sys.stderr)
    print(f"lva: lending {', '.join(f'{d.name} ({d.description})' for d in devices)} on {host}:{port}; "
          f"use it with --rpc {host}:{port}; Ctrl+C stops", file=sys.stderr, flush=True)
    threads = args.threads or os.cpu_count() or 1
    server = threading.Thread(target=rpc.serve, args=(host, port, devices, threads), daemon=True)
    server.start()
    try:
        while server.is_alive():
            server.join(0.5)
    except KeyboardInterrupt:
        print("lva: RPC server stopped", file=sys.stderr)
        return 0
    print(f"lva: error: could not listen on {host}:{port} (port in use, or not an address of this machine)",
          file=sys.stderr)
    return 1

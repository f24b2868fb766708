"""ggml's RPC backend: the devices of another process, or another machine, as ggml devices.

A ggml RPC server (`lva rpc-server`, or llama.cpp's `rpc-server` of the same ggml) lends its devices over
TCP. A client adds the server; its devices join ggml's device list as RPC0, RPC1, ... (in the order they
were added), llama.cpp can offload layers to them and lva's graphs can run there. Their memory is not
this process's: every tensor get and set crosses the socket. llama.cpp uses the same mechanism to run
one model across machines.

The protocol has no authentication and no encryption: whoever reaches the port can run graphs and read
the server's memory. A server listens on the loopback unless told otherwise.

ggml aborts the whole process when it cannot reach a server or the server speaks another protocol
version, so `add_server` first says hello itself and turns either into a one-line `RpcError`.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from ctypes import c_char_p, c_size_t, c_void_p

from models import ggml
from models.errors import LvaError
from models.ggml import Device, _lib

# ggml-rpc.h of the pinned ggml: the protocol version a server must speak (same major, minor not newer).
PROTOCOL_MAJOR, PROTOCOL_MINOR = 7, 0
HELLO_COMMAND = 14                       # RPC_CMD_HELLO: | cmd (1 byte) | size (8 bytes) | conn_caps (24 bytes) |
CONNECTION_CAPS_BYTES = 24               # zeros: plain TCP, no transport upgrade
DEFAULT_PORT = 50052
BUILD_HINT = 'rebuild it with CMAKE_ARGS="-DGGML_RPC=on" (README: "GPUs")'

_ADD_SERVER = ctypes.CFUNCTYPE(c_void_p, c_char_p)
_START_SERVER = ctypes.CFUNCTYPE(None, c_char_p, c_char_p, c_size_t, c_size_t, ctypes.POINTER(c_void_p))
_added: dict[str, list[Device]] = {}     # endpoint -> its devices; ggml keeps a server for the whole process


class RpcError(LvaError):
    """An RPC server that cannot be used, or a build without the RPC backend; the message is one line."""


def require() -> None:
    """Raise RpcError, with how to rebuild, when this build of ggml has no RPC backend."""
    if not _lib.ggml_backend_reg_by_name(b"RPC"):
        raise RpcError(f"this llama-cpp-python was built without ggml's RPC backend; {BUILD_HINT}")


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port). ggml's client splits at the first colon, so a host has none (no IPv6)."""
    host, sep, port = endpoint.strip().partition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RpcError(f"{endpoint!r} is not an RPC server address; write HOST:PORT, e.g. 192.168.1.20:{DEFAULT_PORT}")
    return host, int(port)


def add_server(endpoint: str, timeout: float = 10.0) -> list[Device]:
    """Register a ggml RPC server; returns its devices (already registered ones come back as they were)."""
    host, port = parse_endpoint(endpoint)
    endpoint = f"{host}:{port}"
    if endpoint in _added:
        return _added[endpoint]
    add = _ADD_SERVER(_proc_address("ggml_backend_rpc_add_server"))
    hello(host, port, timeout)
    registry = add(endpoint.encode())
    if not registry:
        raise RpcError(f"the RPC server at {endpoint} lends no devices")
    _lib.ggml_backend_register(registry)
    found = [Device.from_handle(_lib.ggml_backend_reg_dev_get(registry, i))
             for i in range(_lib.ggml_backend_reg_dev_count(registry))]
    _added[endpoint] = found
    return found


def hello(host: str, port: int, timeout: float) -> None:
    """Connect and check the server's protocol version, as ggml's own client does before it trusts a server."""
    where = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as connection:
            connection.sendall(bytes([HELLO_COMMAND]) + struct.pack("<Q", CONNECTION_CAPS_BYTES)
                               + bytes(CONNECTION_CAPS_BYTES))
            size = struct.unpack("<Q", _receive(connection, 8))[0]
            reply = _receive(connection, size) if size == 4 + CONNECTION_CAPS_BYTES else b""
    except TimeoutError:
        raise RpcError(f"the RPC server at {where} did not answer within {timeout:.0f} s "
                       f"(busy with another client? a server serves one at a time)") from None
    except OSError as exc:
        raise RpcError(f"cannot reach an RPC server at {where} ({exc.strerror or exc}); "
                       f"is `lva rpc-server` running there?") from None
    if not reply:
        raise RpcError(f"{where} did not answer as a ggml RPC server of protocol {PROTOCOL_MAJOR}.x")
    major, minor, patch = reply[:3]
    if major != PROTOCOL_MAJOR or minor > PROTOCOL_MINOR:
        raise RpcError(f"the RPC server at {where} speaks protocol {major}.{minor}.{patch}; this lva needs "
                       f"{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}.x: run the server from the same llama-cpp-python")


def _receive(connection: socket.socket, n_bytes: int) -> bytes:
    data = b""
    while len(data) < n_bytes:
        chunk = connection.recv(n_bytes - len(data))
        if not chunk:
            raise ConnectionError("the connection closed")
        data += chunk
    return data


def serve(host: str, port: int, devices: list[Device], n_threads: int) -> None:
    """Serve `devices` on HOST:PORT until the process ends (ggml's server loop; one client at a time).

    Returns only when ggml could not start listening (it has printed why on stderr).
    """
    start = _START_SERVER(_proc_address("ggml_backend_rpc_start_server"))
    handles = (c_void_p * len(devices))(*(d.handle for d in devices))
    start(f"{host}:{port}".encode(), None, n_threads, len(devices), handles)


def _proc_address(name: str) -> int:
    require()
    registry = _lib.ggml_backend_reg_by_name(b"RPC")
    address = _lib.ggml_backend_reg_get_proc_address(registry, name.encode())
    if not address:
        raise RpcError(f"ggml's RPC backend has no {name}")
    return address


def devices_to_serve(names: list[str] | None) -> list[Device]:
    """The named devices, else every GPU of this machine, else its CPU (as llama.cpp's rpc-server chooses)."""
    every = [d for d in ggml.devices() if d.backend != "RPC"]
    if names:
        chosen = []
        for name in names:
            device = next((d for d in every if d.name == name), None)
            if device is None:
                known = ", ".join(d.name for d in every)
                raise RpcError(f"no device named {name!r} here (devices: {known})")
            chosen.append(device)
        return chosen
    return [d for d in every if d.kind in (ggml.DEVICE_GPU, ggml.DEVICE_IGPU)] or [ggml.cpu_device()]

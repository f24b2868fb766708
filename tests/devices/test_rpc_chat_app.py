"""The chat app names the device its model runs on, here an RPC server's."""

from __future__ import annotations

import asyncio

from assistant.tui.app import LvaApp
from assistant.tui.widgets.status_bar import StatusBar
from tests.test_tui import install_tiny_model, ready, until


def test_the_status_bar_names_the_rpc_device(rpc_server) -> None:
    install_tiny_model()

    async def run() -> None:
        app = LvaApp(rpc_servers=[rpc_server.endpoint], n_gpu_layers=4)
        async with app.run_test(size=(120, 36)) as pilot:
            screen = await ready(pilot)
            status = screen.query_one(StatusBar)
            await until(lambda: status.device != "")
            assert status.device == f"CPU 1/4 layers + {rpc_server.device} 3/4 layers"
            assert f"CPU 1/4 layers + {rpc_server.device} 3/4 layers" in str(status.render())

    asyncio.run(run())

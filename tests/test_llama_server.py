"""llama-server as tutor_wrap runs it: loopback only, a free port, its Jinja engine on the GGUF's template, and
always stopped, also when the block that uses it fails."""

import shutil
import socket

import pytest

from tutor_wrap.backends import llamacpp
from tutor_wrap.backends.gguf_export import convert_model
from tutor_wrap.backends.llama_server import HOST, serve
from tutor_wrap.data.alpaca import ALPACA, AlpacaRow
from tutor_wrap.models.files import write_chat_template


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


@pytest.fixture(scope="module")
def gguf(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    model = tmp / "model"
    shutil.copytree(tiny_model, model)
    write_chat_template(model, ALPACA.chat_template)
    out = tmp / "tiny-F16.gguf"
    convert_model(llamacpp.locate(), model, out, "f16", tmp / "convert.log")
    return out


def test_the_server_renders_the_training_prompt_and_stops(gguf, tmp_path):
    ll = llamacpp.locate()
    rows = [AlpacaRow(1, "Say ok.", "", ""), AlpacaRow(2, "Explain this error.", "NameError: x", "")]
    with serve(ll, gguf, ctx=256, log=tmp_path / "server.log") as server:
        port = server.port
        assert listening(port)
        for row in rows:
            assert server.apply_template(ALPACA.messages(row)) == ALPACA.prompt(row)
            direct, _ = server.complete(ALPACA.prompt(row), n_predict=8)
            assert server.chat(ALPACA.messages(row), n_predict=8)[0] == direct
    assert not listening(port)
    assert f"--host {HOST}" in (tmp_path / "server.log").read_text()


def test_the_server_is_stopped_when_the_block_fails(gguf, tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with serve(llamacpp.locate(), gguf, ctx=128, log=tmp_path / "server.log") as server:
            port = server.port
            raise RuntimeError("boom")
    assert not listening(port)

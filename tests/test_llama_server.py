"""llama-server as tutor_wrap runs it: loopback only, a free port, its Jinja engine on the GGUF's template, and
always stopped, also when the block that uses it fails."""

import shutil
import socket

import pytest

from tutor_wrap.backends import llamacpp
from tutor_wrap.backends.gguf_export import convert_model
from tutor_wrap.backends.llama_server import HOST, answer_all, serve, serve_many
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.data.alpaca import ALPACA, AlpacaRow
from tutor_wrap.models.files import write_chat_template

pytestmark = pytest.mark.tools


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


def test_several_servers_answer_as_one_does_and_all_stop(gguf, tmp_path):
    """Requests shared out over one-slot servers (one thread each) get the answers one server (two threads) gives,
    in the order asked; every server is stopped after the block, also when a request fails."""
    ll = llamacpp.locate()
    prompts = [ALPACA.prompt(AlpacaRow(i, f"Say something about {i}.", "", "")) for i in range(12)]
    with serve(ll, gguf, ctx=256, log=tmp_path / "one.log", threads=2) as server:
        alone = answer_all(server, prompts, n_predict=24)
    done = []
    with serve_many(ll, gguf, ctx=256, log=tmp_path / "many.log", servers=3, threads=1) as servers:
        ports = [s.port for s in servers]
        assert len(set(ports)) == 3 and all(listening(p) for p in ports)
        shared = answer_all(servers, prompts, n_predict=24, done=lambda: done.append(1))
        with pytest.raises(TutorWrapError, match="HTTP 400"):
            answer_all(servers, prompts[:4] + [{"not": "a prompt"}] + prompts[4:], n_predict=4)
    assert shared == alone and len(done) == len(prompts)
    assert len({t for t, _ in alone}) > 1          # the prompts differ, so order mix-ups would show
    assert not any(listening(p) for p in ports)
    assert sorted(p.name for p in tmp_path.glob("many*.log")) == ["many-1.log", "many-2.log", "many.log"]


def test_a_gguf_check_is_one_function_and_one_line(gguf, monkeypatch):
    """The checks every exported GGUF gets are a list: a throwaway one added there runs on the real file and its
    problem fails the export's verification by name; the shipped ones pass this GGUF."""
    from tutor_wrap.checks import gguf as gguf_checks

    ll = llamacpp.locate()
    assert gguf_checks.verify(ll, gguf, "F16", chat_template=ALPACA.chat_template)["chat_template_matches_training"]
    seen = []

    def named_llama(g):
        seen.append(g.meta["architecture"])
        return "an architecture named llama" if g.meta["architecture"] == "llama" else None

    monkeypatch.setattr(gguf_checks, "CHECKS", [*gguf_checks.CHECKS, named_llama])   # the registry line
    with pytest.raises(TutorWrapError, match="failed verification: an architecture named llama"):
        gguf_checks.verify(ll, gguf, "F16")
    assert seen == ["llama"]

"""Downloads from a hub, against a real hub-compatible server on loopback (olah, tests/hub_server.py): only the files
the pipeline reads arrive, the recorded commit is honoured, too little disk is refused before a byte is written, a
missing repository gives one clear error, the token is never written, and the tools then run offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hub_server import commit_files, serve

pytestmark = pytest.mark.e2e   # a hub server and the CLI through the plan stage, ~30 s a test

TOKEN = "hf_tutorwrapTESTtoken0123456789abcdef"   # a planted token: it must reach no file and no output
ROWS = [{"query": f"Write a function that returns {i}.", "response": f"```python\ndef f():\n    return {i}\n```",
         "source": "synthetic"} for i in range(60)]


def _model_files(model: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    # What a careless download would also take: Meta's consolidated checkpoint and a pickled copy of the weights.
    files["original/consolidated.00.pth"] = os.urandom(4096)
    files["pytorch_model.bin"] = os.urandom(4096)
    files["consolidated.safetensors"] = os.urandom(4096)   # Mistral's own-format copy, beside the HF weights
    files["README.md"] = b"# tiny\n"
    return files


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("hub")
    with serve(root) as h:
        h.model_commit = commit_files(h.repo("model", "testorg/tiny-llama"), _model_files(tiny_model), "weights")
        h.model_files = {p.name for p in tiny_model.iterdir() if p.is_file()}
        rows = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
        h.data_commit = commit_files(h.repo("dataset", "testorg/py-alpaca"),
                                     {"data/train.jsonl": rows, "README.md": b"# rows\n"}, "rows")
        yield h


def _recipe(tmp: Path, **over) -> Path:
    r = {"name": "hubrun", "base_model": "testorg/tiny-llama",
         "dataset": {"hub": "testorg/py-alpaca", "fields": {"instruction": "query", "output": "response"}, "limit": 40},
         "train": {"max_steps": 1, "sequence_len": 256}, "ollama": {"model": "hubrun"}}
    r.update(over)
    (tmp / "recipe.yml").write_text(yaml.safe_dump(r))
    return tmp / "recipe.yml"


def _cli(tmp: Path, hub, *args: str, hf_home: Path | None = None, **env) -> subprocess.CompletedProcess:
    e = {**os.environ, "HF_HOME": str(hf_home or tmp / "hf"), "HF_ENDPOINT": hub.url if hub else "http://127.0.0.1:9",
         "HF_HUB_OFFLINE": "0", "HF_HUB_DOWNLOAD_TIMEOUT": "60", "HF_HUB_ETAG_TIMEOUT": "60",
         "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": TOKEN, "CUDA_VISIBLE_DEVICES": "", **env}
    e.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "tutor_wrap", *args], cwd=tmp, env=e, capture_output=True, text=True,
                          timeout=600)


def _snapshot(hf_home: Path, kind: str, repo: str, commit: str) -> Path:
    return hf_home / "hub" / f"{kind}s--{repo.replace('/', '--')}" / "snapshots" / commit


def _files_under(p: Path) -> set[str]:
    return {str(f.relative_to(p)) for f in p.rglob("*") if f.is_file() or f.is_symlink()}


def _no_token_anywhere(*places: Path, texts: tuple[str, ...] = ()) -> None:
    for t in texts:
        assert TOKEN not in t
    for place in places:
        for f in place.rglob("*"):
            if f.is_file() and not f.is_symlink() and f.stat().st_size < 50_000_000:
                assert TOKEN.encode() not in f.read_bytes(), f


def test_run_until_plan_fetches_just_what_it_reads_and_plans(hub, tmp_path):
    """The issue's "done when": an empty HF cache, a hub model and a hub dataset, `run --until plan`."""
    proc = _cli(tmp_path, hub, "run", str(_recipe(tmp_path)), "--until", "plan", "--run-dir", "run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    hf, run = tmp_path / "hf", tmp_path / "run"
    snap = _snapshot(hf, "model", "testorg/tiny-llama", hub.model_commit)
    # config, tokenizer, safetensors: never original/ or the pickled duplicate (nor the README)
    assert _files_under(snap) == hub.model_files
    m = json.loads((run / "manifest.json").read_text())
    assert m["sources"]["base_model"] == {"repo": "testorg/tiny-llama", "revision": "main", "commit": hub.model_commit}
    assert m["sources"]["dataset"]["commit"] == hub.data_commit
    # the split's first 40 rows, the mapped columns under the format's keys, once, in the run dir
    data = list((run / "data").glob("*.jsonl"))
    assert len(data) == 1
    rows = [json.loads(line) for line in data[0].read_text().splitlines()]
    assert len(rows) == 40 and rows[3]["instruction"] == ROWS[3]["query"] and rows[3]["output"] == ROWS[3]["response"]
    # Axolotl trains on those files: the snapshot folder and the materialized rows, offline
    cfg = yaml.safe_load((run / "axolotl.yml").read_text())
    assert Path(cfg["base_model"]).resolve() == snap.resolve()
    assert Path(run, cfg["datasets"][0]["path"]).resolve() == data[0].resolve()
    # the rows were checked and measured like a local file's: the plan counted their tokens
    # the sizes came from the hub before the download (what the disk check compares): the files' real bytes
    sent = sum((snap / f).stat().st_size for f in hub.model_files)
    assert f"fetch: testorg/tiny-llama at {hub.model_commit[:12]}: {len(hub.model_files)} of {len(hub.model_files)} " \
           f"files, {sent / 1e6:.1f} MB" in proc.stdout
    _no_token_anywhere(run, hf, texts=(proc.stdout, proc.stderr))

    # After the download the tools run offline, on the files fetched: no server at all, --offline or HF_HUB_OFFLINE.
    for args, env in ((("--offline",), {}), ((), {"HF_HUB_OFFLINE": "1"})):
        again = _cli(tmp_path, None, "run", str(_recipe(tmp_path)), "--until", "plan", "--run-dir", "run2", *args,
                     hf_home=hf, **env)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "fetch: testorg/tiny-llama" not in again.stdout   # nothing downloaded; the rows written from the cache
        assert json.loads((tmp_path / "run2/manifest.json").read_text())["sources"] == m["sources"]
    # plan and preflight use what the cache has, the same way
    plan = _cli(tmp_path, None, "plan", str(_recipe(tmp_path)), "--run-dir", "run", "--no-validate", "--json",
                hf_home=hf, HF_HUB_OFFLINE="1")
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "not in the Hugging Face cache" not in plan.stderr and "not downloaded" not in plan.stderr


def test_revision_recorded_and_honoured(hub, tmp_path, tiny_model):
    repo = "testorg/tiny-rev"
    first = commit_files(hub.repo("model", repo), _model_files(tiny_model), "first")
    recipe = _recipe(tmp_path, base_model=repo, dataset={"path": "rows.jsonl"})
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"instruction": r["query"], "output": r["response"]}) + "\n"
                                                 for r in ROWS[:20]))
    assert _cli(tmp_path, hub, "run", str(recipe), "--until", "plan", "--run-dir", "run").returncode == 0
    gen = json.loads((tiny_model / "generation_config.json").read_text())
    second = commit_files(hub.repo("model", repo),
                          {"generation_config.json": json.dumps({**gen, "temperature": 0.3}).encode()}, "second")
    # a rerun of the same run dir reads the same files: the commit it recorded, not the new main
    proc = _cli(tmp_path, hub, "run", str(recipe), "--until", "plan", "--run-dir", "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "run/manifest.json").read_text())
    assert m["sources"]["base_model"]["commit"] == first
    assert first in yaml.safe_load((tmp_path / "run/axolotl.yml").read_text())["base_model"]
    # a new run takes main as it is now; `revision:` pins the first commit again
    assert _cli(tmp_path, hub, "fetch", str(recipe), "--run-dir", "new").returncode == 0
    assert json.loads((tmp_path / "new/manifest.json").read_text())["sources"]["base_model"]["commit"] == second
    pinned = _recipe(tmp_path, base_model=repo, revision=first, dataset={"path": "rows.jsonl"})
    proc = _cli(tmp_path, hub, "fetch", str(pinned), "--run-dir", "pinned")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"base_model: {repo} at {first}" in proc.stdout
    snap = _snapshot(tmp_path / "hf", "model", repo, first)
    assert "temperature" not in (snap / "generation_config.json").read_text()


def test_missing_repository_and_revision_are_one_clear_error(hub, tmp_path):
    proc = _cli(tmp_path, hub, "fetch", str(_recipe(tmp_path, base_model="testorg/no-such-model")))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "testorg/no-such-model was not found on the hub" in proc.stderr
    proc = _cli(tmp_path, hub, "fetch", str(_recipe(tmp_path, revision="v9.9")))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "has no revision 'v9.9'" in proc.stderr or "was not found" in proc.stderr, proc.stderr
    _no_token_anywhere(texts=(proc.stdout, proc.stderr))
    assert not (tmp_path / "hf" / "hub" / "models--testorg--no-such-model" / "snapshots").exists()


def test_unreachable_hub_is_one_clear_error(tmp_path):
    proc = _cli(tmp_path, None, "fetch", str(_recipe(tmp_path)))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "the hub could not be reached" in proc.stderr and "HF_ENDPOINT" in proc.stderr


def test_too_little_disk_is_refused_before_a_byte_is_written(hub, tmp_path, small_disk):
    proc = _cli(tmp_path, hub, "fetch", str(_recipe(tmp_path)), hf_home=small_disk / "hf")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "not enough disk" in proc.stderr and "nothing was downloaded" in proc.stderr, proc.stderr
    assert "HF_HOME" in proc.stderr
    assert [f for f in small_disk.rglob("*") if f.is_file()] == []


def test_ctrl_c_mid_download_stops_at_once_and_the_next_run_completes(hub, tmp_path):
    """Ctrl-C mid-download stops the transfer where it is (not at the end of the file), huggingface_hub keeps the
    partial blob (`*.incomplete`) and the next run asks for the rest (`Range: bytes=N-`). olah answers such a request with the whole file (200; it ignores Range), so
    here the rerun starts that file over: what this proves is that the kill leaves no file under its final name and
    the rerun completes with the right bytes; the byte-level resume is the real hub's 206."""
    import hashlib
    import signal
    import time

    from tiny_model import build_tiny_llama

    wide = build_tiny_llama(tmp_path / "wide", hidden_size=768, intermediate_size=2048)   # ~60 MB of weights
    commit_files(hub.repo("model", "testorg/wide-llama"), _model_files(wide), "weights")
    recipe = _recipe(tmp_path, base_model="testorg/wide-llama", dataset={"path": "rows.jsonl"})
    (tmp_path / "rows.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    hf = tmp_path / "hf"
    env = {**os.environ, "HF_HOME": str(hf), "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
           "HF_HUB_DOWNLOAD_TIMEOUT": "60", "HF_HUB_ETAG_TIMEOUT": "60"}
    # SIGINT as a terminal sends it: a runner started in the background (`make test &`) ignores it, and a child
    # inherits that, so Python would install no KeyboardInterrupt handler; the default is restored for the child.
    proc = subprocess.Popen([sys.executable, "-m", "tutor_wrap", "fetch", str(recipe)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    partial = 0
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        sizes = [f.stat().st_size for f in hf.rglob("*.incomplete") if f.is_file()]
        if sizes and max(sizes) > 2_000_000:
            os.killpg(proc.pid, signal.SIGINT)
            partial = max(sizes)
            break
        time.sleep(0.005)
    stopped = time.monotonic()
    assert proc.wait(timeout=60) == 130
    assert partial, "the download finished before it could be interrupted: make the served model larger"
    assert time.monotonic() - stopped < 10
    blobs = hf / "hub" / "models--testorg--wide-llama" / "blobs"
    left = [f.stat().st_size for f in blobs.glob("*.incomplete")]
    assert left and max(left) < (wide / "model.safetensors").stat().st_size, "stopped mid-file, the partial kept"
    snapshots = hf / "hub" / "models--testorg--wide-llama" / "snapshots"
    assert not any(p.name == "model.safetensors" for p in snapshots.rglob("*")), "a partial file under its final name"

    again = _cli(tmp_path, hub, "fetch", str(recipe))
    assert again.returncode == 0, again.stderr[-2000:]
    snap = next(snapshots.iterdir())
    assert hashlib.sha256((snap / "model.safetensors").read_bytes()).digest() == \
        hashlib.sha256((wide / "model.safetensors").read_bytes()).digest()
    assert not list(blobs.glob("*.incomplete"))


def test_a_gated_repository_names_its_page_and_the_token_ways(monkeypatch):
    """olah has no gated repositories (its offline mode answers RepoNotFound for anything it lacks), so this one
    case goes through the hub library's own error, built from the response the hub sends for a gated repository."""
    import httpx
    from huggingface_hub.errors import GatedRepoError

    from tutor_wrap.backends.hub import _hub_error

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    url = "https://huggingface.co/meta-llama/Meta-Llama-3-8B/resolve/main/config.json"
    response = httpx.Response(403, headers={"X-Error-Code": "GatedRepo"}, request=httpx.Request("GET", url))
    err = _hub_error(GatedRepoError("Access to model meta-llama/Meta-Llama-3-8B is restricted", response=response),
                     "meta-llama/Meta-Llama-3-8B", "model", "main", "recipe.yml: base_model")
    text = f"{err} {err.hint}"
    assert "is gated: the token this machine gives has no access" in text
    assert "/meta-llama/Meta-Llama-3-8B" in text and "hf auth login" in text and "HF_TOKEN" in text
    assert TOKEN not in text
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", "/nonexistent-home")   # no stored token either
    err = _hub_error(GatedRepoError("restricted", response=response), "meta-llama/Meta-Llama-3-8B", "model", "main", "x")
    assert "needs a token of an account that accepted its license" in str(err)


def test_what_is_wrong_with_a_repository_is_said_before_a_byte_is_downloaded(hub, tmp_path, tiny_model):
    pickled = {k: v for k, v in _model_files(tiny_model).items() if not k.endswith(".safetensors")}
    commit_files(hub.repo("model", "testorg/pickled"), pickled, "bin only")
    proc = _cli(tmp_path, hub, "fetch", str(_recipe(tmp_path, base_model="testorg/pickled")))
    assert proc.returncode == 1 and "has only pickled weights" in proc.stderr and "allow_pickle_weights" in proc.stderr
    no_tok = {k: v for k, v in _model_files(tiny_model).items() if not k.startswith("tokenizer")}
    commit_files(hub.repo("model", "testorg/no-tokenizer"), no_tok, "no tokenizer")
    proc = _cli(tmp_path, hub, "fetch", str(_recipe(tmp_path, base_model="testorg/no-tokenizer")))
    assert proc.returncode == 1 and "testorg/no-tokenizer has no tokenizer" in proc.stderr
    assert not list((tmp_path / "hf" / "hub").glob("models--testorg--*/blobs/*"))
    proc = _cli(tmp_path, hub, "fetch", str(_recipe(tmp_path, base_model="testorg/ti..ny")))
    assert proc.returncode == 1 and "is not a valid hub id" in proc.stderr and "Traceback" not in proc.stderr


def test_hub_dataset_columns_and_sharegpt_turns(hub, tmp_path, tiny_chat_model):
    rows = "".join(json.dumps({"conv": [{"from": "human", "value": f"Name list method {i}."},
                                         {"from": "gpt", "value": "append"}]}) + "\n" for i in range(20)).encode()
    commit_files(hub.repo("dataset", "testorg/sg"), {"train.jsonl": rows}, "sharegpt")
    commit_files(hub.repo("model", "testorg/tiny-chat"), {p.name: p.read_bytes() for p in tiny_chat_model.iterdir()
                                                           if p.is_file()}, "chat model")
    sg = {"hub": "testorg/sg", "format": "sharegpt", "chat_template": "chatml"}
    # the column of turns unmapped: said with the columns, before a rows file is written
    proc = _cli(tmp_path, hub, "run", str(_recipe(tmp_path, base_model="testorg/tiny-chat", dataset=sg)), "--until",
                "plan", "--run-dir", "sg")
    assert proc.returncode == 1 and "the rows need 'conversations', and the dataset's columns are conv" in proc.stderr
    assert not list((tmp_path / "sg").glob("data/*.jsonl"))
    proc = _cli(tmp_path, hub, "run", str(_recipe(tmp_path, base_model="testorg/tiny-chat",
                                                  dataset={**sg, "fields": {"messages": "conv"}})),
                "--until", "plan", "--run-dir", "sg")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = next((tmp_path / "sg").glob("data/*.jsonl"))
    assert json.loads(data.read_text().splitlines()[0])["conversations"][1]["value"] == "append"
    # a rows file edited since is made again from the pinned commit, not trusted
    data.write_text(data.read_text()[:50])
    proc = _cli(tmp_path, hub, "run", str(_recipe(tmp_path, base_model="testorg/tiny-chat",
                                                  dataset={**sg, "fields": {"messages": "conv"}})),
                "--until", "plan", "--run-dir", "sg")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(data.read_text().splitlines()) == 20


def test_cache_that_cannot_be_written_and_a_run_dir_of_another_recipe(hub, tmp_path):
    (tmp_path / "a-file").write_text("")
    proc = _cli(tmp_path, hub, "fetch", str(_recipe(tmp_path)), hf_home=tmp_path / "a-file" / "hf")
    assert proc.returncode == 1 and "the Hugging Face cache" in proc.stderr and "cannot be written" in proc.stderr
    assert "HF_HOME" in proc.stderr and "Traceback" not in proc.stderr
    assert _cli(tmp_path, hub, "fetch", str(_recipe(tmp_path)), "--run-dir", "shared").returncode == 0
    other = tmp_path / "other"
    other.mkdir()
    proc = _cli(other, hub, "fetch", str(_recipe(other, name="another")), "--run-dir", str(tmp_path / "shared"),
                hf_home=tmp_path / "hf")
    assert proc.returncode == 1 and "holds the run of recipe 'hubrun'" in proc.stderr

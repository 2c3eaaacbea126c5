"""Security: nothing unpickles, remote code only when the recipe asks, API keys never leak.

Static checks walk the AST of every module under ``src/noisealign``; behavioural checks load
files whose pickle would run a shell command, and run the collect stage with an API judge
whose key is a sentinel that must appear nowhere but the request header.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from noisealign.cli import STAGES
from noisealign.errors import DataError

pytestmark = pytest.mark.reliability
SRC = Path(__file__).resolve().parents[2] / "src" / "noisealign"
MODULES = sorted(SRC.rglob("*.py"))
SENTINEL = "sk-SENTINEL-reliability-7d2e41"
ENV = "NOISEALIGN_RELIABILITY_API_KEY"


def _calls(tree: ast.AST, dotted: str):
    """Calls whose function reads ``dotted`` (e.g. ``torch.load``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == dotted:
            yield node


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


@pytest.fixture(scope="module")
def trees():
    return {path.relative_to(SRC).as_posix(): ast.parse(path.read_text()) for path in MODULES}


# ---- static: no unpickling code path ----------------------------------------------------
def test_every_torch_load_is_weights_only(trees):
    found = 0
    for name, tree in trees.items():
        for call in _calls(tree, "torch.load"):
            found += 1
            value = _keyword(call, "weights_only")
            assert isinstance(value, ast.Constant) and value.value is True, (
                f"{name}:{call.lineno}: torch.load without weights_only=True"
            )
    assert found >= 1  # convert_npnet reads official .pth files


def test_no_pickle_modules_and_no_pickled_numpy(trees):
    banned = {"dill", "joblib", "cloudpickle", "shelve", "marshal", "_pickle"}
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                )
                for module in modules:
                    assert module.split(".")[0] not in banned, (
                        f"{name}:{node.lineno}: imports {module}"
                    )
                if isinstance(node, ast.ImportFrom) and node.module == "pickle":
                    pytest.fail(f"{name}:{node.lineno}: from pickle import ...")
            # `import pickle` is tolerated only to name its exception class
            if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "pickle":
                assert node.attr == "UnpicklingError", f"{name}:{node.lineno}: pickle.{node.attr}"
            if isinstance(node, ast.keyword) and node.arg in ("allow_pickle", "weights_only"):
                expected = node.arg == "weights_only"
                assert isinstance(node.value, ast.Constant) and node.value.value is expected, (
                    f"{name}: {node.arg}={ast.unparse(node.value)}"
                )
        for dotted in ("np.load", "numpy.load"):
            for call in _calls(tree, dotted):
                assert _keyword(call, "allow_pickle") is None, f"{name}:{call.lineno}"
        # accelerate loads registered custom objects with weights_only=False
        assert not list(_calls(tree, "accelerator.register_for_checkpointing")), name


# ---- static + behavioural: remote code only from the recipe -----------------------------
def test_trust_remote_code_is_never_hard_coded_true(trees):
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                assert not isinstance(node.value, ast.Constant) or node.value.value is False, (
                    f"{name}: trust_remote_code={ast.unparse(node.value)}"
                )
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (
                    len(node.args.args) - len(node.args.defaults)
                ) + node.args.defaults
                defaults += node.args.kw_defaults
                for arg, default in zip(args, defaults):
                    if arg.arg == "trust_remote_code":
                        assert isinstance(default, ast.Constant) and default.value is False, (
                            f"{name}:{node.lineno}: {node.name}(trust_remote_code=...) must "
                            "default to False"
                        )


def test_every_stage_config_defaults_trust_remote_code_off():
    for module_name in STAGES.values():
        config_cls = getattr(importlib.import_module(module_name), "CONFIG_CLASS", None)
        if config_cls is None:  # convert_npnet takes plain arguments and loads no hub code
            continue
        fields = {f.name: f for f in dataclasses.fields(config_cls)}
        assert fields["trust_remote_code"].default is False, module_name


@pytest.mark.parametrize("recipe_value", [None, "true"])
def test_stages_pass_the_recipes_trust_remote_code_to_the_loader(
    tiny, tmp_path, monkeypatch, recipe_value
):
    """collect, distill, train_projector, generate hand exactly the recipe's value to
    load_pipeline."""
    import noisealign.pipelines

    seen = []

    class Stop(Exception):
        pass

    def spy(name, torch_dtype="float32", trust_remote_code=False, **kwargs):
        seen.append(trust_remote_code)
        raise Stop

    from noisealign import collect, distill, generate, train_projector

    # every module that holds the loader, whether it imports it at its top or at call time
    original = noisealign.pipelines.load_pipeline
    for module in [m for name, m in sys.modules.items() if name.startswith("noisealign")]:
        if getattr(module, "load_pipeline", None) is original:
            monkeypatch.setattr(module, "load_pipeline", spy)

    from .test_bad_inputs import collect as collect_args
    from .test_bad_inputs import distill as distill_args
    from .test_bad_inputs import generate as generate_args
    from .test_bad_inputs import train_projector as train_projector_args

    extra = [] if recipe_value is None else ["--trust_remote_code", recipe_value]
    for module, build in (
        (collect, collect_args),
        (distill, distill_args),
        (train_projector, train_projector_args),
        (generate, generate_args),
    ):
        argv = build(tiny, tmp_path / module.__name__.split(".")[-1])[1:] + extra
        with pytest.raises(Stop):
            module.main(argv)
    assert seen == [recipe_value == "true"] * 4


# ---- behavioural: files whose pickle would run code are refused, never unpickled --------
class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_object_in_official_pth_is_refused_unexecuted(tmp_path):
    from noisealign.policies.npnet_convert import read_official

    path = tmp_path / "npnet.pth"
    torch.save({"unet_embedding": Payload(tmp_path / "PWNED"), "alpha": torch.zeros(())}, path)
    with pytest.raises(DataError, match="npnet.pth"):
        read_official(path)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("planted", ["optimizer.bin", "random_states_0.pkl"])
def test_pickled_object_in_a_checkpoint_never_runs(tiny, tmp_path, planted):
    """accelerate's load_state reads these with weights_only=True: a planted payload never runs.

    A bad optimizer state stops the resume with a DataError; accelerate itself skips
    unreadable random states with an info log, so that resume goes on (without running it).
    """
    from noisealign import distill

    from .test_bad_inputs import distill as distill_args

    out = tmp_path / "out"
    argv = distill_args(tiny, out)[1:] + ["--save_steps", "1"]
    distill.main(argv)
    checkpoint = out / "checkpoints" / "checkpoint-2"
    torch.save({"state": Payload(tmp_path / "PWNED")}, checkpoint / planted)
    resume = argv + ["--resume_from_checkpoint", str(checkpoint), "--max_steps", "3"]
    if planted == "optimizer.bin":
        with pytest.raises(DataError, match="checkpoint-2' is corrupt"):
            distill.main(resume)
    else:
        distill.main(resume)
    assert not (tmp_path / "PWNED").exists()


# ---- behavioural: the API key never leaves the request header ---------------------------
class FakeAPI(BaseHTTPRequestHandler):
    """OpenAI-compatible replies; questions about 'blue' time out; records Authorization headers."""

    headers_seen: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeAPI.headers_seen.append(self.headers.get("Authorization", ""))
        question = body["messages"][0]["content"][1]["text"]
        if "blue" in question:
            time.sleep(0.5)  # longer than the judge's timeout
        top = [{"token": "Yes", "logprob": -0.5}, {"token": "No", "logprob": -1.0}]
        reply = {
            "choices": [
                {
                    "message": {"content": "Yes"},
                    "logprobs": {
                        "content": [{"token": "Yes", "logprob": -0.5, "top_logprobs": top}]
                    },
                }
            ]
        }
        payload = json.dumps(reply).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the judge timed out and left
            pass


@pytest.fixture
def api(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeAPI)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeAPI.headers_seen = []
    monkeypatch.setenv(ENV, SENTINEL)
    for proxy in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _tree_text(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())


def test_api_judge_timeouts_become_failed_rows_and_the_key_never_leaks(
    tiny, tmp_path, api, monkeypatch, caplog, capfd
):
    """The collect stage with an API judge: prompts about 'blue' time out on every retry."""
    from accelerate import Accelerator

    from noisealign import collect

    from .test_bad_inputs import collect as collect_args

    tracked = []
    monkeypatch.setattr(
        Accelerator,
        "init_trackers",
        lambda self, project, config=None, init_kwargs=None: tracked.append(config),
    )
    monkeypatch.setenv("WANDB_MODE", "disabled")
    caplog.set_level("DEBUG")
    kwargs = {
        "model": "fake-vlm",
        "base_url": api,
        "api_key_env": ENV,
        "timeout": 0.2,
        "max_retries": 1,
        "backoff": 0.01,
    }
    out = tmp_path / "out"
    argv = collect_args(
        tiny,
        out,
        "--judge",
        "openai",
        "--judge_kwargs",
        json.dumps(kwargs),
        "--judge_retries",
        "1",
        "--report_to",
        "wandb",
    )[1:]
    dataset = collect.main(argv)

    # the run completes; the blue prompt's rows are recorded as failed with the timeout
    assert dataset.num_rows == 4
    failed = {r["prompt"]: r for r in dataset if r["failed"]}
    assert set(failed) == {"a blue square"}
    assert "after 2 attempts" in failed["a blue square"]["error"]
    assert all(0 <= r["overall"] <= 1 for r in dataset if not r["failed"])
    # the key was sent, and nowhere else: logs, tracker config, recipe.json, dataset files
    assert f"Bearer {SENTINEL}" in FakeAPI.headers_seen
    assert tracked and SENTINEL not in json.dumps(tracked, default=str)
    captured = capfd.readouterr()
    assert SENTINEL not in caplog.text + captured.out + captured.err
    assert SENTINEL.encode() not in _tree_text(out)


def test_credential_like_values_are_redacted_everywhere_they_are_saved(tiny, tmp_path, monkeypatch):
    """A judge plugin that takes its key as an argument: the key stays out of recipe.json and the
    tracker."""
    from noisealign import collect, judges
    from noisealign.tracking import redact

    from .test_bad_inputs import collect as collect_args

    class KeyedJudge:
        name = "keyed"

        def __init__(self, api_key: str) -> None:
            self.inner = judges.build_judge("shapes")

        def score(self, images, prompts, concepts=None):
            return self.inner.score(images, prompts, concepts)

    monkeypatch.setitem(judges.JUDGES, "keyed", KeyedJudge)
    assert redact(
        {"judge_kwargs": {"api_key": SENTINEL, "hf_token": SENTINEL}, "x": [{"password": SENTINEL}]}
    ) == {
        "judge_kwargs": {"api_key": "<redacted>", "hf_token": "<redacted>"},
        "x": [{"password": "<redacted>"}],
    }
    out = tmp_path / "out"
    argv = collect_args(
        tiny, out, "--judge", "keyed", "--judge_kwargs", json.dumps({"api_key": SENTINEL})
    )[1:]
    collect.main(argv)
    assert SENTINEL.encode() not in _tree_text(out)

"""Security properties (issue 9): weights from safetensors only, no remote code, services on loopback, no secrets."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest
import torch

from medplib.config.home import REPO_ROOT
from medplib.config.model import ModelConfig

SOURCES = [p for package in ("medplib", "medplib_cli", "flows") for p in sorted((REPO_ROOT / package).rglob("*.py"))]


def _tiny_llama(folder: Path, safe: bool) -> ModelConfig:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = ModelConfig.tiny()
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=cfg.llm.hidden_size, intermediate_size=cfg.llm.intermediate_size,
                                         num_hidden_layers=cfg.llm.num_layers, num_attention_heads=cfg.llm.num_heads,
                                         num_key_value_heads=cfg.llm.num_kv_heads, vocab_size=64))
    if safe:
        llama.save_pretrained(folder)
    else:  # a pickled checkpoint, as old LLaVA / Vicuna releases ship them
        folder.mkdir(parents=True)
        llama.config.to_json_file(folder / "config.json")
        torch.save(llama.state_dict(), folder / "pytorch_model.bin")
    return cfg


def test_pickled_weights_are_refused_with_the_file_named(tmp_path: Path):
    from medplib.model.loaders import load_llava

    cfg = _tiny_llama(tmp_path / "pickled", safe=False)
    with pytest.raises(ValueError, match=r"pickled weights \(pytorch_model\.bin\).*safetensors only"):
        load_llava(tmp_path / "pickled", cfg)
    cfg = _tiny_llama(tmp_path / "safe", safe=True)  # the same model as safetensors loads
    llm, _, _ = load_llava(tmp_path / "safe", cfg)
    assert llm.config.hidden_size == cfg.llm.hidden_size


def test_saved_models_hold_no_pickle(tmp_path: Path):
    from medplib.model.loaders import build_model
    from medplib.model.tokenizer import MedTokenizer

    cfg = ModelConfig.tiny()
    tokenizer = MedTokenizer.train(["Is there a liver in this image?", "yes", "no"] * 20, cfg.llm.vocab_size,
                                   cfg.vision.num_patches)
    model = build_model(cfg, tokenizer)
    out = model.save_pretrained(tmp_path / "model")
    files = {p.suffix for p in out.rglob("*") if p.is_file()}
    assert ".safetensors" in files and not files & {".bin", ".pt", ".pth", ".pkl", ".ckpt"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def test_no_remote_code_and_no_pickle_loading_in_the_code():
    found = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for call in _calls(tree):
            name = ast.unparse(call.func)
            if any(k.arg == "trust_remote_code" for k in call.keywords):
                found.append(f"{path}:{call.lineno} passes trust_remote_code")
            if name in ("torch.load", "pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads",
                        "joblib.load", "numpy.load", "np.load"):
                found.append(f"{path}:{call.lineno} calls {name}")
    assert not found, "\n".join(found)


def test_the_logged_pyfunc_is_code_not_a_pickle():
    """MLflow "models from code": `log_pyfunc` logs an entry file, so loading a model unpickles no Python object."""
    from medplib import serve

    source = Path(serve.__file__).read_text(encoding="utf-8")
    assert 'python_model=entry' in source
    entry = REPO_ROOT / "medplib" / "pyfunc_entry.py"
    assert "mlflow.models.set_model(MedPLIBPyfunc())" in entry.read_text(encoding="utf-8")


SERVICE_COMMANDS = (("prefect", "server"), ("mlflow", "server"), ("mlflow", "ui"), ("mlflow", "models"))


def test_every_service_the_code_starts_binds_loopback():
    """Every command line the code builds for a server carries `--host 127.0.0.1`, and no code names 0.0.0.0."""
    starts = []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        assert "0.0.0.0" not in text, f"{path} names 0.0.0.0"
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if not isinstance(node, ast.List):
                continue
            items = [ast.unparse(e) for e in node.elts]
            strings = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            for exe, verb in SERVICE_COMMANDS:
                if verb in strings and any(exe in i for i in items):
                    starts.append(path.name)
                    assert "--host" in strings, f"{path}:{node.lineno} starts `{exe} {verb}` without --host"
                    host = node.elts[[i for i, e in enumerate(node.elts) if isinstance(e, ast.Constant)
                                      and e.value == "--host"][0] + 1]
                    assert isinstance(host, ast.Constant) and host.value == "127.0.0.1", \
                        f"{path}:{node.lineno} binds `{exe} {verb}` to {ast.unparse(host)}"
    # the three places that start servers: `medplib ui` (Prefect + MLflow), the served model, the schedule check
    assert {"main.py", "serve.py"} <= set(starts), starts


SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"AKIA[0-9A-Z]{16}"),
    "private key": re.compile(r"-----BEGIN (RSA |EC |OPENSSH )?PRIVATE KEY-----"),
    "GitHub token": re.compile(r"gh[pousr]_[A-Za-z0-9]{36}"),
    "password in a URI": re.compile(r"://[^/\s:@'\"{}$]+:(?!\$\{|\{)[^@\s/'\"{}$]{3,}@"),
    "assigned secret": re.compile(r"(?i)[\w-]*(secret|password|passwd|token|api_key)\b\s*[:=]\s*['\"][^'\"${}<>]{8,}['\"]"),
}


def test_no_secret_in_a_committed_file():
    files = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    hits = []
    for rel in files.splitlines():
        path = REPO_ROOT / rel
        if rel.startswith("tests/reliability/test_security.py") or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for what, pattern in SECRET_PATTERNS.items():
            for m in pattern.finditer(text):
                hits.append(f"{rel}: {what}: {m.group(0)[:40]}")
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("text, what", [
    ("aws_key = 'AKIAABCDEFGHIJKLMNOP'", "AWS access key id"),
    ("postgresql://mlflow:hunter2pass@db:5432/mlflow", "password in a URI"),
    ('MLFLOW_TRACKING_PASSWORD: "s3cr3t-passw0rd"', "assigned secret"),
], ids=["aws-key", "password-in-uri", "assigned-secret"])  # ids: the planted values must not reach the docs
def test_the_secret_scan_finds_planted_secrets(text, what):
    assert SECRET_PATTERNS[what].search(text)


@pytest.mark.parametrize("text", ["postgresql://mlflow:${POSTGRES_PASSWORD}@db/mlflow",
                                  "password: ${MLFLOW_PASSWORD}", "s3://bucket/{home}/x"],
                         ids=["uri-env-password", "yaml-env-password", "home-template"])
def test_the_secret_scan_lets_environment_references_pass(text):
    assert not any(p.search(text) for p in SECRET_PATTERNS.values())

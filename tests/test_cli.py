"""The command line: tables, one-line errors with exit code 2, and end-to-end runs on the embedded model."""

import subprocess
import sys

import pytest


def kvfold(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvfold", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def kvfold_here(capsys, monkeypatch):
    """Run a command through the same entry point in this process: the outcome `kvfold` would give, without paying
    a fresh interpreter's imports (~8 s each on CI) per error case. The subprocess tests keep the real entry point."""
    from kvfold.cli import run

    def call(*args: str) -> subprocess.CompletedProcess:
        monkeypatch.setattr(sys, "argv", ["kvfold", *args])
        capsys.readouterr()
        try:
            run()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        out = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out.out, out.err)

    return call


def test_methods_lists_every_registered_method():
    result = kvfold("methods")
    assert result.returncode == 0, result.stderr
    for name in ("none", "streaming", "snapkv", "adakv", "kivi", "uniform"):
        assert name in result.stdout


@pytest.mark.parametrize("args, message", [
    (["generate", "--method", "snapk:0.5", "--context", "x", "-q", "y"], "did you mean 'snapkv'"),
    (["generate", "--method", "snapkv:1.5", "--context", "x", "-q", "y"], "ratio must be in [0, 1)"),
    (["generate", "--method", "kivi:3", "--context", "x", "-q", "y"], "bits must be 2, 4 or 8"),
    (["generate", "--method", "snapkv:0.5+", "--context", "x", "-q", "y"], "empty method name"),
    (["generate", "--context-file", "/nonexistent/file.txt", "-q", "y"], "does not exist"),
    (["generate", "-q", "y"], "no context"),
    (["generate", "--model", "/nonexistent/model", "--context", "x", "-q", "y"], "/nonexistent/model"),
    (["demo", "--ratios", "1.2"], "outside [0, 1)"),
    (["generate", "--dtype", "int8", "--context", "x", "-q", "y"], "use float32, bfloat16 or float16"),
    (["chat", "--device", "tpu"], "unknown device 'tpu': use 'cpu', 'cuda' or 'cuda:N'"),
    (["bench", "--out", "x", "--ray", "--device", "cpu"], "--device does not apply with --ray"),
    (["calibrate", "--method", "rotate:osca", "--out", "x.safetensors"], "did you mean 'rotate:oscar'"),
])
def test_bad_input_is_one_clear_line_and_exit_code_2(kvfold_here, args, message):
    result = kvfold_here(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_debug_shows_the_traceback():
    result = kvfold("--debug", "generate", "--method", "snapk:0.5", "--context", "x", "-q", "y")
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.slow
def test_generate_and_demo_run_on_the_embedded_model(tmp_path):
    context = tmp_path / "context.txt"
    context.write_text("The secret code of the vault is 4711. " + "The weather was mild and calm. " * 40)
    result = kvfold("generate", "--method", "snapkv:0.5+kivi:4", "--context-file", str(context),
                    "-q", "What is the secret code of the vault?", "--max-new-tokens", "16")
    assert result.returncode == 0, result.stderr
    assert "A: " in result.stdout and "KV held" in result.stdout and "snapkv:0.5+kivi:4" in result.stdout
    result = kvfold("demo", "--methods", "none,kivi:4", "--length", "600", "--samples", "1", "--out",
                    str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr
    assert "none" in result.stdout and "kivi:4" in result.stdout and "accuracy" in result.stdout
    rows = (tmp_path / "demo" / "results.jsonl").read_text().splitlines()
    assert len(rows) == 4  # 2 methods x the 2 default tasks x 1 sample
    assert all((tmp_path / "demo" / name).is_file() for name in ("report.md", "report.html", "report.png"))


@pytest.mark.slow
def test_chat_answers_each_turn_and_shows_kv_bytes():
    result = subprocess.run([sys.executable, "-m", "kvfold", "chat", "--method", "snapkv:0.5", "--max-new-tokens", "8"],
                            input="Hello! Who are you?\nWhat can you do?\n", capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("bot>") == 2 and result.stdout.count("KV held") == 2


@pytest.mark.parametrize("args", [[], ["nosuchcommand"], ["generate", "--max-new-tokens", "0"]])
def test_usage_errors_show_help_without_a_traceback(kvfold_here, args):
    result = kvfold_here(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "Usage" in result.stdout + result.stderr

"""The command line package: one-line user errors with exit code 2, typed numeric options,
`--import MODULE` for a user's registered networks, and no import cycle in fewstep."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fewstep
from fewstep.cli import build_parser, main
from fewstep.methods import SCT
from fewstep.networks.registry import NETWORKS

REPO = Path(__file__).resolve().parents[1]
CYCLES_TOOL = Path("/work/shared/tools/import_cycles.py")

# A network class of the user's own, following the contract `forward(x, t, labels=None)`; the
# module name is unique to this test so that nothing else imports it.
USER_NET = textwrap.dedent('''
    import torch

    import fewstep.networks


    @fewstep.networks.register_network("test-cli-tiny-mlp")
    class TinyMLP(torch.nn.Module):
        def __init__(self, dim=2, width=16):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(dim + 1, width), torch.nn.SiLU(),
                                            torch.nn.Linear(width, dim))

        def forward(self, x, t, labels=None):
            t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
            return self.body(torch.cat([x, t[:, None]], dim=1))
''')
USER_MODULE = "fewstep_test_cli_user_net"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    """A 3-step sCT run of the user's network; the module is forgotten afterwards, as in a new process."""
    root = tmp_path_factory.mktemp("user")
    module_file = root / f"{USER_MODULE}.py"
    module_file.write_text(USER_NET)
    sys.path.insert(0, str(root))
    try:
        import fewstep_test_cli_user_net as user
    finally:
        sys.path.remove(str(root))
    out = root / "run"
    fewstep.fit(user.TinyMLP(), SCT(), [torch.randn(16, 2)] * 2, out, steps=3, progress=False,
                ckpt_every=0, device="cpu")
    del sys.modules[USER_MODULE]
    NETWORKS.pop("test-cli-tiny-mlp")
    yield out, module_file
    sys.modules.pop(USER_MODULE, None)
    NETWORKS.pop("test-cli-tiny-mlp", None)


# ----------------------------------------------------------------------------------------------
# Numeric options


@pytest.mark.parametrize("argv, message", [
    (["sample", "run", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["sample", "run", "--num", "0"], "argument --num: must be >= 1"),
    (["sample", "run", "--batch-size", "-3"], "argument --batch-size: must be >= 1"),
    (["sample", "run", "--steps", "two"], "must be an integer"),
    (["eval", "run", "--steps", "1,0"], "argument --steps: each value must be >= 1"),
    (["eval", "run", "--nfe", "x"], "argument --nfe: must be comma-separated integers"),
    (["eval", "run", "--num", "1"], "argument --num: must be >= 2"),
    (["search-times", "run", "--grid", "2"], "argument --grid: must be >= 3"),
    (["edit", "run", "--task", "inpaint", "--steps", "0"], "argument --steps: must be >= 1"),
    (["edit", "run", "--task", "sdedit", "--t0", "2"], "argument --t0"),
    (["edit", "run", "--task", "inpaint", "--fraction", "nan"], "argument --fraction"),
    (["train", "--steps", "0"], "argument --steps: must be >= 1"),
    (["plot", "run", "--num", "0"], "argument --num: must be >= 1"),
    (["sample"], "required: checkpoint"),
    ([], "required: COMMAND"),
])
def test_bad_numbers_are_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = one_error_line(capsys)
    assert message in err and err.startswith(f"fewstep{' ' + argv[0] if argv else ''}: error:")


def test_debug_still_shows_tracebacks(monkeypatch, capsys):
    monkeypatch.setenv("FEWSTEP_DEBUG", "1")
    with pytest.raises(ValueError, match="checkpoint not found"):
        main(["sample", "/no/such/run"])
    assert main(["sample", "run", "--steps", "0"]) == 2  # a usage error has no traceback to show
    assert "--steps" in one_error_line(capsys)


def test_every_command_has_examples_and_import(capsys):
    for cmd in ("train", "sample", "eval", "search-times", "ref-stats", "plot", "edit"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = capsys.readouterr().out
        assert "examples:" in text, cmd
        assert ("--import MODULE" in text) == (cmd != "ref-stats"), cmd


def test_eval_and_search_times_take_import():
    parser = build_parser()
    for cmd in ("eval", "search-times", "edit --task inpaint", "sample", "plot"):
        args = parser.parse_args([*cmd.split(), "run", "--import", "a.b", "--import", "c.py"])
        assert args.imports == ["a.b", "c.py"], cmd
    assert parser.parse_args(["train", "--import", "mynets"]).imports == ["mynets"]
    args = parser.parse_args(["eval", "run", "--steps", "1,2,4", "--sampler", "heun,euler"])
    assert args.steps == [1, 2, 4] and args.sampler == ["heun", "euler"] and args.imports == []


# ----------------------------------------------------------------------------------------------
# --import MODULE


def test_sample_needs_the_import_of_a_user_network(user_run, tmp_path, capsys):
    run, module_file = user_run
    out = tmp_path / "s.png"
    assert main(["sample", str(run), "--num", "8", "--device", "cpu", "--out", str(out)]) == 2
    err = one_error_line(capsys)
    assert "'test-cli-tiny-mlp' is not registered" in err and "--import" in err and "register_network" in err
    assert USER_MODULE not in sys.modules  # the checkpoint imported nothing by itself
    assert main(["sample", str(run), "--import", str(module_file), "--num", "8", "--steps", "1", "--device", "cpu",
                 "--out", str(out), "--npz", str(tmp_path / "s.npz")]) == 0
    assert out.is_file() and "NFE 1" in capsys.readouterr().out
    x = torch.from_numpy(__import__("numpy").load(tmp_path / "s.npz")["x"])
    assert x.shape == (8, 2) and torch.isfinite(x).all()
    # by module name, from the import path, in a "new process"
    del sys.modules[USER_MODULE]
    NETWORKS.pop("test-cli-tiny-mlp")
    sys.path.insert(0, str(module_file.parent))
    try:
        assert main(["sample", str(run), "--import", USER_MODULE, "--num", "4", "--device", "cpu",
                     "--out", str(out)]) == 0
    finally:
        sys.path.remove(str(module_file.parent))
    capsys.readouterr()


def test_eval_scores_a_user_network_with_import(user_run, tmp_path, capsys):
    """`fewstep eval --import`: a user's network trained by `fit` on its own data, scored against
    a reference array with exact sample distances, NFE beside each row."""
    import json

    import numpy as np

    run, module_file = user_run
    ref = tmp_path / "ref.npy"
    np.save(ref, np.random.default_rng(0).normal(size=(300, 2)).astype(np.float32))
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--import", str(module_file), "--steps", "1,2", "--num", "200", "--ref", str(ref),
                 "--device", "cpu", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["nfe"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["sliced_wasserstein"]) for r in rows)
    NETWORKS.pop("test-cli-tiny-mlp", None)
    sys.modules.pop(USER_MODULE, None)
    capsys.readouterr()


def test_edit_takes_import(user_run, capsys):
    """`fewstep edit --import` loads the user's checkpoint, then says what editing needs."""
    run, module_file = user_run
    assert main(["edit", str(run), "--task", "denoise", "--import", str(module_file), "--device", "cpu"]) == 2
    assert "editing works on image models" in one_error_line(capsys)


def test_import_errors_are_one_line(tmp_path, capsys):
    assert main(["sample", "run", "--import", "no_such_module_for_fewstep"]) == 2
    assert "--import no_such_module_for_fewstep: no module named 'no_such_module_for_fewstep'" in \
        one_error_line(capsys)
    assert main(["sample", "run", "--import", str(tmp_path / "missing.py")]) == 2
    assert "missing.py: no such file" in one_error_line(capsys)
    broken = tmp_path / "broken_user_module.py"
    broken.write_text("import torch\n\nraise RuntimeError('oops\\nsecond line')\n")
    assert main(["eval", "run", "--import", str(broken)]) == 2
    err = one_error_line(capsys)
    assert f"--import {broken} failed: RuntimeError: oops second line" in err
    assert "broken_user_module" not in sys.modules


# ----------------------------------------------------------------------------------------------
# Layout


def test_no_import_cycles():
    if not CYCLES_TOOL.is_file():
        pytest.skip(f"{CYCLES_TOOL} not here")
    done = subprocess.run([sys.executable, str(CYCLES_TOOL), str(REPO / "fewstep")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 import cycle(s)" in done.stdout


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_library_modules_import_no_argparse_and_no_cli():
    """argparse lives in fewstep/cli; the library never imports the CLI (only `python -m fewstep` runs it)."""
    package = REPO / "fewstep"
    for path in package.rglob("*.py"):
        if path.relative_to(package).parts[0] in ("cli", "__main__.py"):
            continue
        names = _imported(path)
        assert "argparse" not in names and not any(n.startswith("fewstep.cli") for n in names), path

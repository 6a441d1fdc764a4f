"""The first-hour rough edges of issue 15, through the real command lines: a file that is not a
safe sgdet checkpoint is one line in sgdet's words at every entry point; argument errors share
the ``PROG: error:`` voice; ``--out`` is checked before the work and named as the user gave it;
``sgdet info | head`` ends quietly; ``classification eval`` follows the checkpoint's
architecture; detectors are not offered to ``sgdet compress``; a run that fails early leaves no
config.yaml/log.txt behind; every output, checkpoints included, follows the umask."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import sgdet
from sgdet.detection.shapes import make_shapes_dataset
from sgdet.files import write_text

from test_engine import CLASSES, make_imagefolder, result_rows, write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
DIGITS = os.path.join(ROOT, "configs", "transfer", "example_digits.yaml")
DETECTION = os.path.join(ROOT, "configs", "faster_rcnn_sg_r50.yaml")
sys.path.insert(0, os.path.join(ROOT, "tools"))


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600, **kwargs)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny ImageFolder and its config, a shapes COCO set, a pickled nn.Module, random bytes,
    a lenet5 checkpoint for the ImageFolder's 4 classes at 3x28x28 and a plain lenet5 one."""
    root = tmp_path_factory.mktemp("inputs")
    data = make_imagefolder(str(root / "imagefolder"), n_train=2, n_val=2)
    config = write_config(str(root / "cls.yaml"), data, str(root / "unused"))
    make_shapes_dataset(root / "shapes" / "train", 2, 64, seed=0)
    make_shapes_dataset(root / "shapes" / "val", 2, 64, seed=1)
    module = root / "module.pt"
    torch.save(nn.Sequential(nn.Linear(2, 2)), module)            # torch.save(model): pickled
    junk = root / "random.bin"
    # seeded: some random first bytes are valid pickle opcodes and fail later, in other words
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    torch.manual_seed(0)
    lenet = root / "lenet5_c3.sg.pt"
    sgdet.save(sgdet.build("lenet5", num_classes=CLASSES, in_channels=3), lenet)
    grey = root / "lenet5.sg.pt"
    sgdet.save(sgdet.build("lenet5"), grey)
    return {"root": root, "config": config, "module": str(module), "random": str(junk),
            "lenet": str(lenet), "grey": str(grey)}


def _detection_opts(root, weights, out) -> list[str]:
    return ["DATASETS.ROOT", str(root), "DATASETS.REGISTER",
            '[["t_train","shapes/train/instances.json","shapes/train/images"],'
            '["t_val","shapes/val/instances.json","shapes/val/images"]]',
            "DATASETS.TRAIN", '["t_train"]', "DATASETS.TEST", '["t_val"]',
            "MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", weights,
            "OUTPUT_DIR", str(out)]


def _entry_point(name, inputs, weights, out) -> tuple[list[str], str]:
    """(arguments after ``python``, the voice of its errors) of one entry point reading ``weights``."""
    if name == "sgdet info":
        return ["-m", "sgdet.cli", "info", weights], "sgdet"
    if name == "sgdet compress --weights":
        return ["-m", "sgdet.cli", "compress", "--arch", "lenet5", "--conv-ratio", "0.5", "--fc-ratio",
                "0.5", "--weights", weights, "--out", str(out / "x.sg.pt")], "sgdet"
    if name == "classification eval":
        return ["-m", "classification", "eval", "--config", inputs["config"], "MODEL.WEIGHTS", weights,
                "OUTPUT_DIR", str(out)], "classification"
    if name == "transfer eval":
        return ["-m", "transfer", "eval", "--config", DIGITS, "MODEL.WEIGHTS", weights,
                "OUTPUT_DIR", str(out)], "transfer"
    return ([os.path.join("tools", "train_net.py"), "--config-file", DETECTION,
             *_detection_opts(inputs["root"], weights, out)], "train_net.py")


@pytest.mark.parametrize("kind, entry", [
    ("module", "sgdet info"), ("module", "sgdet compress --weights"), ("module", "classification eval"),
    ("module", "transfer eval"), ("module", "tools/train_net.py"),
    ("random", "sgdet info"), ("random", "classification eval")])
def test_unsafe_file_is_one_line_in_sgdets_words_and_leaves_no_debris(inputs, tmp_path, kind, entry):
    """torch's "two options ... trust the source" text (ANSI codes and all) never reaches the
    user; the run that failed on it leaves no OUTPUT_DIR behind (classification, transfer,
    detection: the folder did not exist before)."""
    path = inputs[kind]
    out = tmp_path / "out"
    args, voice = _entry_point(entry, inputs, path, out)
    proc = _run(args)
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert "Traceback" not in err and "trust" not in err and "\x1b[" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith(f"{voice}: error: {path} is not a safe sgdet checkpoint ("), err
    assert ("it holds a pickled torch.nn.modules.container.Sequential" in last if kind == "module"
            else "not a torch file" in last), last
    assert not out.exists(), sorted(os.listdir(out))


def test_failed_resume_keeps_the_runs_own_config_and_log(inputs, tmp_path):
    """A run into an existing run folder that fails before producing anything gives the folder
    back as it found it: config.yaml's old bytes, log.txt cut back, other files untouched."""
    from classification.__main__ import main
    out = tmp_path / "run"
    out.mkdir()
    write_text(out / "config.yaml", "OUTPUT_DIR: the earlier run\n")
    write_text(out / "log.txt", "the earlier run's log\n")
    write_text(out / "results.md", "| earlier |\n")
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    rc = main(["train", "--config", inputs["config"], "--resume", "MODEL.WEIGHTS", inputs["module"],
               "OUTPUT_DIR", str(out)])
    assert rc == 2
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_rollback_leaves_a_run_that_wrote_results_alone(tmp_path):
    """Only a run that produced nothing is undone; one that wrote anything else keeps its log."""
    from sgdet.files import Rollback
    folder = tmp_path / "a" / "b"
    undo = Rollback(folder)
    write_text(folder / "config.yaml", "x: 1\n")
    write_text(folder / "log.txt", "started\n")
    assert undo.undo() and not (tmp_path / "a").exists()     # the folders it made go too
    undo = Rollback(folder)
    write_text(folder / "log.txt", "started\n")
    write_text(folder / "metrics.jsonl", "{}\n")
    assert not undo.undo() and (folder / "log.txt").exists()


def _one_voice_error(capsys, main, argv, voice) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "usage:" not in err, err
    assert err.startswith(f"{voice}: error: "), err
    return err


def test_argument_errors_are_one_line_in_each_programs_voice(capsys):
    import train_net
    from classification.__main__ import main as classification_main
    from sgdet.cli import main as sgdet_main
    from transfer.__main__ import main as transfer_main
    err = _one_voice_error(capsys, sgdet_main, ["compress", "--arch", "lenet5", "--conv-ratio", "abc",
                                                "--fc-ratio", "0.5", "--out", "x.sg.pt"], "sgdet")
    assert "--conv-ratio: not a number: 'abc'" in err and "sgdet compress --help" in err
    _one_voice_error(capsys, sgdet_main, ["frobnicate"], "sgdet")
    _one_voice_error(capsys, classification_main, ["train"], "classification")
    _one_voice_error(capsys, classification_main, ["demo", "--epochs", "x"], "classification")
    _one_voice_error(capsys, transfer_main, ["table", "--config", DIGITS], "transfer")
    err = _one_voice_error(capsys, train_net.main, ["--num-gpus", "x"], "train_net.py")
    assert "--num-gpus: invalid int value: 'x'" in err


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_out_is_checked_before_the_work_and_named_as_given(tmp_path, where):
    """lenet5 with 16 groups logs a line during compression ('10 filters < groups=16'): an
    error alone on stderr shows the check came first. The temporary file is never named."""
    if where == "proc" and not os.path.isdir("/proc/self"):
        pytest.skip("no /proc")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = str(blocker / "sub" / "x.sg.pt") if where == "under_a_file" else "/proc/sgdet-out.sg.pt"
    proc = _run(["-m", "sgdet.cli", "compress", "--arch", "lenet5", "--conv-ratio", "0.5",
                 "--fc-ratio", "0.5", "--out", out])
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"sgdet: error: cannot write --out {out}: ") and ".tmp-" not in err, err
    assert not os.path.exists(out)


def test_deploy_export_and_table_check_out_first(inputs, tmp_path, capsys):
    from sgdet.cli import main
    from transfer.__main__ import main as transfer_main
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for argv in (["deploy", inputs["lenet"], "--out", str(blocker / "d.sg.pt")],
                 ["export", inputs["lenet"], "--format", "torchscript", "--out", str(blocker / "m.ts")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"cannot write --out {argv[-1]}: {blocker} is a file, not a folder" in err, err
    run = tmp_path / "table"
    assert transfer_main(["table", "--config", DIGITS, "--checkpoints", inputs["lenet"],
                          "--out", str(blocker), "OUTPUT_DIR", str(run)]) == 2
    assert f"cannot write --out {blocker}" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not run.exists()


def test_writer_errors_name_the_users_file_not_the_temporary_one(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for target in (blocker / "x.txt", "/proc/sgdet-x.txt"):
        with pytest.raises(OSError) as info:
            write_text(target, "x")
        assert info.value.filename == str(target) and ".tmp-" not in str(info.value)


def test_info_into_a_closed_pipe_ends_quietly(inputs):
    """``sgdet info FILE | head -1``: the reader is gone before sgdet writes."""
    reader_gone = subprocess.Popen([PYTHON, "-m", "sgdet.cli", "info", inputs["grey"]], cwd=ROOT,
                                   env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader_gone.stdout.close()
    err = reader_gone.stderr.read().decode()
    assert reader_gone.wait(timeout=600) in (0, 141) and err == "", err


def test_classification_eval_follows_the_checkpoints_architecture(inputs, tmp_path, capsys):
    """MODEL.ARCH resnet18 but MODEL.WEIGHTS a lenet5 checkpoint: eval evaluates the lenet5
    (as transfer does); training from it says which MODEL.ARCH to set, in one line."""
    from classification.__main__ import main
    out = tmp_path / "eval"
    assert main(["eval", "--config", inputs["config"], "MODEL.WEIGHTS", inputs["lenet"],
                 "MODEL.ARCH", "resnet18", "OUTPUT_DIR", str(out)]) == 0
    assert result_rows(str(out))[0].startswith("| LeNet-5 ")
    capsys.readouterr()
    assert main(["compress", "--config", inputs["config"], "MODEL.WEIGHTS", inputs["lenet"],
                 "MODEL.ARCH", "resnet18", "OUTPUT_DIR", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("holds a lenet5, but MODEL.ARCH is resnet18; set MODEL.ARCH lenet5"), err
    assert main(["eval", "--config", inputs["config"], "MODEL.WEIGHTS", inputs["lenet"],
                 "MODEL.INPUT_SIZE", "[1, 28, 28]", "OUTPUT_DIR", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is a lenet5 for 3-channel input, but MODEL.INPUT_SIZE is [1, 28, 28]" in err, err


def test_detectors_are_not_offered_to_compress(tmp_path, capsys):
    import sgdet.detection  # noqa: F401  (registers faster_rcnn)
    from sgdet.cli import main
    assert "faster_rcnn" in sgdet.ARCHITECTURES
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    compress_help = capsys.readouterr().out
    assert "lenet5" in compress_help and "faster_rcnn" not in compress_help
    assert main(["compress", "--arch", "faster_rcnn", "--conv-ratio", "0.5", "--fc-ratio", "0.5",
                 "--out", str(tmp_path / "x.sg.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sgdet: error: --arch faster_rcnn is a detector") and err.count("\n") == 1, err


_WRITE_EVERYTHING = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
    import torch, sgdet
    from sgdet.deploy.export import export
    from classification.__main__ import main
    from test_engine import make_imagefolder, write_config
    tmp, out = sys.argv[2], os.path.join(sys.argv[2], "out")
    torch.manual_seed(0)
    model = sgdet.build("lenet5")
    sgdet.compress(model, conv_ratio=0.5, fc_ratio=0.5, groups=4, step=None)
    sgdet.save(model, os.path.join(out, "masked.sg.pt"))
    deployed = sgdet.deploy(model).eval()
    sgdet.save(deployed, os.path.join(out, "deployed.sg.pt"))
    export(deployed, os.path.join(out, "deployed.ts"), "torchscript", torch.randn(1, 1, 28, 28))
    data = make_imagefolder(os.path.join(tmp, "data"), n_train=2, n_val=2)
    config = write_config(os.path.join(tmp, "cls.yaml"), data, os.path.join(out, "run"))
    sys.exit(main(["train", "--config", config, "SOLVER.EPOCHS", "1"]))
""")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_output_follows_the_umask(tmp_path, umask):
    """Checkpoints (sgdet.save, the Trainer's last_checkpoint.pt and model_final.sg.pt),
    TorchScript, config.yaml, log.txt, metrics.jsonl, results.md, TensorBoard: all get the
    permissions a plain open() would give them (mkstemp alone makes 0600 files)."""
    proc = _run(["-c", _WRITE_EVERYTHING, ROOT, str(tmp_path)], umask=umask)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    seen = set()
    for folder, dirs, files in os.walk(out):
        for name in dirs:
            mode = stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode)
            assert mode == 0o777 & ~umask, (os.path.join(folder, name), oct(mode))
        for name in files:
            mode = stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode)
            assert mode == 0o666 & ~umask, (os.path.join(folder, name), oct(mode))
            seen.add(name)
    assert {"masked.sg.pt", "deployed.sg.pt", "deployed.ts", "model_final.sg.pt", "last_checkpoint.pt",
            "config.yaml", "log.txt", "metrics.jsonl", "results.md"} <= seen, seen


def test_info_counts_a_checkpoint_at_its_own_input_channels(inputs, capsys):
    """A lenet5 built for RGB (in_channels=3) is counted at 3x28x28, not lenet5's usual 1x28x28
    (which was a traceback from the convolution)."""
    from sgdet.cli import main
    assert main(["info", inputs["lenet"]]) == 0
    assert "params: " in capsys.readouterr().out

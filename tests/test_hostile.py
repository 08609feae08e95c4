"""A hostile and a careless user: what a trusted tool must never do, tried through the CLI.

Nothing runs untrusted code (a planted pickle writes a marker file when unpickled: no command
and no ``from_pretrained`` ever writes it by default); nothing is trained on corrupt data (a
checksum or a value out of range stops every read); nothing of the user's is deleted (their files
stay byte-identical, no temporary folder is left behind); and every failure a user can cause or
meet is one ``Error:`` line, never a traceback.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import joblib
import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.linear_model import LogisticRegression

from chiptuning.cache import CacheReader
from chiptuning.cli import main
from chiptuning.errors import ChipTuningError
from chiptuning.io import file_checksums
from chiptuning.probe import ChipSet, load_chips
from chiptuning.prune import ChipModel, read_provenance
from chiptuning.prune.provenance import PROVENANCE_FILE, record_hash
from tests.conftest import SENTENCES, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- helpers --------------------------------------------------------------------------------------

def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def output_lines(text: str) -> list[str]:
    """What a command printed, without log records (INFO / WARNING lines of the logging module)."""
    return [line for line in text.splitlines()
            if line.strip() and not line.startswith(("INFO ", "WARNING ", "DEBUG "))]


def assert_one_line_error(result, *needles, status=None):
    """Non-zero exit (``status`` when given), one line starting with 'Error:', no traceback."""
    assert result.exit_code != 0, result.output
    if status is not None:
        assert result.exit_code == status, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = output_lines(result.output)
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_subprocess_one_line(proc: subprocess.CompletedProcess, *needles, status=None):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    if status is not None:
        assert proc.returncode == status, proc.stdout + proc.stderr
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text and "Exception ignored" not in text, text
    # (a fresh process also shows what libraries print while loading a model: only our lines count)
    errors = [line for line in output_lines(text) if line.startswith("Error")]
    assert len(errors) == 1 and output_lines(text)[-1] == errors[0] and errors[0].startswith("Error: "), text
    for needle in needles:
        assert needle in errors[0], errors[0]


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def leftovers(root: Path) -> list[str]:
    """Temporary folders or files anywhere under root (``.NAME.tmp-*``, ``.NAME.old-*``, ``*.tmp``)."""
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*")
                  if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".tmp"))


def same_features(cache: Path, reference: Path) -> None:
    """Every layer of ``cache`` equals ``reference``'s (up to float rounding: another process may run
    the model with another number of threads)."""
    a, b = CacheReader(cache), CacheReader(reference)
    assert list(a.example_ids) == list(b.example_ids)
    for layer in a.layers:
        np.testing.assert_allclose(a.layer(layer), b.layer(layer), rtol=1e-5, atol=1e-6)


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def env() -> dict[str, str]:
    # no PYTHONPATH and a cwd outside the repository: the child imports the installed chiptuning
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def run_cli(*args, timeout=300) -> subprocess.CompletedProcess:
    """``python -m chiptuning ARGS`` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "chiptuning", *map(str, args)], capture_output=True, text=True,
                          env=env(), timeout=timeout, cwd="/")


def _sigint_as_in_a_terminal() -> None:
    """A test suite started in the background (``cmd &``) passes SIGINT on as *ignored*, and Python
    then installs no KeyboardInterrupt handler: give the child the default, as a terminal would."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_patched(script: str, *args) -> subprocess.Popen:
    """A fresh interpreter that patches chip-tuning (``script``), then runs the CLI on ``args``."""
    code = textwrap.dedent(script) + "\nimport sys\nfrom chiptuning.cli import main\nmain(sys.argv[1:])\n"
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(), cwd="/",
                            preexec_fn=_sigint_as_in_a_terminal)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended first: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.05)


class _Plant:
    """Unpickling this runs ``exec``: it writes the marker file. What an attacker would plant."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def plant_pickle(path: Path, marker: Path) -> Path:
    joblib.dump({2: _Plant(marker)}, path)
    return path


def rehash_checkpoint(root: Path) -> None:
    """What an attacker who edited a checkpoint does: recompute the (unkeyed) checksums."""
    record = json.loads((root / PROVENANCE_FILE).read_text())
    record["checksums"] = file_checksums(root, exclude=(PROVENANCE_FILE,))
    record.pop("record_sha256", None)
    record["record_sha256"] = record_hash(record)
    (root / PROVENANCE_FILE).write_text(json.dumps(record))


def mount_tmpfs(path: Path, size: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("a small tmpfs needs Linux and mount(8)")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()}")


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


# -- what every test starts from --------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tiny_models, tmp_path_factory):
    """Data, a cache (3 shards), linear chips with a selection, and a pruned checkpoint of the tiny
    Llama, all made through the CLI: the user's finished work that hostile commands run against."""
    root = tmp_path_factory.mktemp("hostile")
    rows = []
    for i, (p, n) in enumerate(zip(SENTENCES["pos"], SENTENCES["neg"])):
        rows += [{"id": f"p{i}", "text": p, "label": "pos"}, {"id": f"n{i}", "text": n, "label": "neg"}]
    data = write_jsonl(root / "data.jsonl", rows)
    model = tiny_models["llama"]
    cache, chips, pruned = root / "cache", root / "chips", root / "pruned"
    extract = ("extract", "--model", model, "--data", data, "--text-column", "text", "--device", "cpu",
               "--shard-size", "8")
    for args in (extract + ("--out", cache),
                 ("probe", "train", cache, "--out", chips, "--val-size", "4", "--epochs", "3"),
                 ("select", chips, "--strategy", "fixed:3"),
                 ("prune", "--model", model, "--chips", chips, "--out", pruned)):
        result = cli(*args)
        assert result.exit_code == 0, result.output
    return {"root": root, "data": data, "model": model, "cache": cache, "chips": chips, "pruned": pruned,
            "extract": extract, "rows": rows}


# -- 1. nothing runs untrusted code ---------------------------------------------------------------

def test_the_planted_pickle_is_real(tmp_path):
    """Control: unpickling the plant does write the marker (so its absence below means something)."""
    marker = tmp_path / "marker"
    joblib.load(plant_pickle(tmp_path / "x.joblib", marker))
    assert marker.read_text() == "code ran"


def test_a_pickle_in_a_chips_directory_is_never_loaded(world, tmp_path):
    marker = tmp_path / "MARKER"
    chips = copy(world["chips"], tmp_path / "chips")
    record = json.loads((chips / "chips.json").read_text())
    plant_pickle(chips / "chips.joblib", marker)
    # every way a record can name the pickle: a logistic chip's weights, a torch chip's, a legacy
    # logreg record without "weights" (whose default was the pickle)
    variants = [dict(record, chip="logreg", weights="chips.joblib"), dict(record, weights="chips.joblib"),
                {k: v for k, v in dict(record, chip="logreg").items() if k != "weights"}]
    metrics = json.loads((chips / "metrics.json").read_text())
    for variant in variants:
        # the records agree with each other (metrics of the same kind, listed with their sha256)
        (chips / "metrics.json").write_text(json.dumps(dict(metrics, chip=variant["chip"])))
        variant = dict(variant, files=dict(record["files"], **{"metrics.json": hashlib.sha256(
            (chips / "metrics.json").read_bytes()).hexdigest()}))
        (chips / "chips.json").write_text(json.dumps(variant))
        before = tree_digest(chips)
        assert_one_line_error(cli("select", chips, "--strategy", "fixed:2"), "pickle", "--allow-pickle")
        assert_one_line_error(cli("prune", "--model", world["model"], "--chips", chips, "--layer", "2",
                                  "--out", tmp_path / "p"), "pickle")
        with pytest.raises(ChipTuningError, match="pickle"):
            load_chips(chips)
        assert tree_digest(chips) == before
    assert not marker.exists()
    assert not (tmp_path / "p").exists() and not leftovers(tmp_path)
    # only the explicit opt-in unpickles it
    load_chips(chips, allow_pickle=True)
    assert marker.exists()


def test_weights_paths_stay_inside_their_directory(world, tmp_path):
    marker = tmp_path / "MARKER"
    plant_pickle(tmp_path / "x.bin", marker)
    chips = copy(world["chips"], tmp_path / "deep" / "er" / "chips")
    record = json.loads((chips / "chips.json").read_text())
    for weights in ("../../../x.bin", str(tmp_path / "x.bin"), "..", "sub/chips.safetensors"):
        (chips / "chips.json").write_text(json.dumps(dict(record, weights=weights)))
        assert_one_line_error(cli("select", chips, "--strategy", "fixed:2", "--allow-pickle"),
                              "not a file name inside the directory")
    assert not marker.exists()


def test_a_pickle_in_a_downloaded_checkpoint_is_never_loaded(world, tmp_path, monkeypatch):
    """The attacker swaps the chip for a pickle and re-hashes every checksum: the provenance check
    passes (sha256 is unkeyed), and still nothing is unpickled: not by eval, push, nor from_pretrained."""
    marker = tmp_path / "MARKER"
    pruned = copy(world["pruned"], tmp_path / "downloaded")
    chip = pruned / "chip"
    (chip / "chip.safetensors").unlink()
    plant_pickle(chip / "chip.joblib", marker)
    record = json.loads((chip / "chip.json").read_text())
    (chip / "chip.json").write_text(json.dumps(dict(record, weights="chip.joblib")))
    rehash_checkpoint(pruned)
    before = tree_digest(pruned)
    with pytest.raises(ChipTuningError, match="pickle"):
        ChipModel.from_pretrained(pruned)
    assert_one_line_error(cli("eval", pruned, "--data", world["data"], "--out", tmp_path / "e"), "pickle")
    assert_one_line_error(cli("push", pruned, "--repo-id", "me/m"), "pickle", "--allow-pickle")
    assert not marker.exists()
    assert tree_digest(pruned) == before and not (tmp_path / "e").exists()
    # the legacy name of a logistic chip without "weights" in its record, as genuine old checkpoints had
    (chip / "chip.json").write_text(json.dumps({k: v for k, v in dict(record, chip="logreg").items()
                                                if k != "weights"}))
    rehash_checkpoint(pruned)
    with pytest.raises(ChipTuningError, match="pickle"):
        ChipModel.from_pretrained(pruned)
    assert not marker.exists()
    # a chip file replaced by something else than safetensors
    shutil.rmtree(chip)
    shutil.copytree(world["pruned"] / "chip", chip)
    (chip / "chip.safetensors").write_bytes(b"\x80\x04not safetensors at all" * 100)
    rehash_checkpoint(pruned)
    assert_one_line_error(cli("eval", pruned, "--data", world["data"], "--out", tmp_path / "e"),
                          "chip.safetensors", "not a readable safetensors file")


def test_a_pickle_at_an_early_exit_is_never_loaded(world, tmp_path):
    """An early-exit checkpoint keeps more chips (one per exit): a pickle at any of them is refused too."""
    marker = tmp_path / "MARKER"
    chips = copy(world["chips"], tmp_path / "chips")
    assert cli("select", chips, "--strategy", "cascade:0.5").exit_code == 0
    pruned = tmp_path / "pruned"
    result = cli("prune", "--model", world["model"], "--chips", chips, "--out", pruned)
    assert result.exit_code == 0, result.output
    exits = sorted((pruned / "chip" / "exits").glob("layer-*")) if (pruned / "chip" / "exits").is_dir() else []
    if not exits:
        pytest.skip("the tiny model's validation set chose no early exit")
    record = json.loads((exits[0] / "chip.json").read_text())
    (exits[0] / "chip.safetensors").unlink()
    plant_pickle(exits[0] / "chip.joblib", marker)
    (exits[0] / "chip.json").write_text(json.dumps(dict(record, weights="chip.joblib")))
    rehash_checkpoint(pruned)
    with pytest.raises(ChipTuningError, match="pickle"):
        ChipModel.from_pretrained(pruned)
    assert_one_line_error(cli("eval", pruned, "--data", world["data"], "--out", tmp_path / "e"), "pickle")
    assert not marker.exists()


def test_logistic_chips_carry_no_pickle_and_load_without_opt_in(world, tmp_path):
    chips, pruned = tmp_path / "chips", tmp_path / "pruned"
    assert cli("probe", "train", world["cache"], "--chip", "logreg", "--out", chips, "--val-size", "4",
               "--layers", "1-3").exit_code == 0
    assert cli("prune", "--model", world["model"], "--chips", chips, "--layer", "2", "--out", pruned).exit_code == 0
    everything = list(chips.rglob("*")) + list(pruned.rglob("*"))
    assert not [p for p in everything if p.suffix in (".joblib", ".pkl", ".pickle")]
    clf = ChipModel.from_pretrained(pruned)  # no allow_pickle
    texts = [row["text"] for row in world["rows"]]
    expected = load_chips(chips).chip(2).predict(CacheReader(world["cache"]).layer(2))
    assert list(clf.predict_index(texts)) == list(expected)
    assert "pickle" not in (pruned / "README.md").read_text().lower()


def test_another_estimator_needs_the_opt_in_and_says_so_loudly(world, tmp_path):
    """A scikit-learn estimator chip-tuning does not store itself: only with allow_pickle, and then the
    model card and push say that loading it runs code."""
    reader = CacheReader(world["cache"])
    estimator = LogisticRegression().fit(reader.layer(2), reader.labels)
    base = load_chips(world["chips"]).record
    chipset = ChipSet(dict(base.to_dict(), layers=[2], chip="logreg"), sklearn_chips={2: estimator},
                      metrics=[{"layer": 2, "chip": "logreg"}])
    with pytest.raises(ChipTuningError, match="allow_pickle"):
        chipset.save(tmp_path / "chips")
    assert not (tmp_path / "chips").exists()
    chipset.save(tmp_path / "chips", allow_pickle=True)
    pruned = tmp_path / "pruned"
    assert_one_line_error(cli("prune", "--model", world["model"], "--chips", tmp_path / "chips", "--layer", "2",
                              "--out", pruned), "pickle")
    result = cli("prune", "--model", world["model"], "--chips", tmp_path / "chips", "--layer", "2", "--out", pruned,
                 "--allow-pickle")
    assert result.exit_code == 0, result.output
    card = (pruned / "README.md").read_text()
    assert "WARNING: this checkpoint holds a pickle" in card and "allow_pickle=True" in card
    assert_one_line_error(cli("push", pruned, "--repo-id", "me/m"), "holds a pickle", "--allow-pickle")
    result = cli("push", pruned, "--repo-id", "me/m", "--allow-pickle")  # offline: the warning, then one line
    assert "WARNING: pushing with --allow-pickle" in result.output
    assert result.exit_code == 1 and output_lines(result.output)[-1].startswith("Error: cannot push")
    with pytest.raises(ChipTuningError, match="pickle"):
        ChipModel.from_pretrained(pruned)
    assert ChipModel.from_pretrained(pruned, allow_pickle=True).chips


# -- 2. nothing is trained on corrupt data --------------------------------------------------------

def _flip(path: Path, offset: int, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["middle", "header"])
def test_a_corrupt_shard_is_refused_before_training(world, tmp_path, where):
    cache = copy(world["cache"], tmp_path / "cache")
    shard = sorted(cache.glob("shard-*.h5"))[1]
    _flip(shard, shard.stat().st_size // 2 if where == "middle" else 200)
    before = tree_digest(cache)
    for command in (("probe", "train", cache, "--out", tmp_path / "chips", "--val-size", "4"),
                    ("probe", "train", world["cache"], "--eval", cache, "--out", tmp_path / "chips", "--val-size", "4"),
                    ("probe", "sweep", cache, "--out", tmp_path / "sweep", "--chips", "linear", "--epochs", "1")):
        assert_one_line_error(cli(*command), shard.name, "cache verify")
    assert_one_line_error(cli("cache", "verify", cache), shard.name)
    assert tree_digest(cache) == before
    assert not (tmp_path / "chips").exists() and not (tmp_path / "sweep").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("value", [np.inf, np.nan, 845.0 * 2 ** 20])
def test_values_out_of_range_are_caught_at_read(world, tmp_path, value):
    """A value no model writes, in a shard whose checksum was updated to match (a careless tool, or an
    attacker): the reader itself refuses it."""
    cache = copy(world["cache"], tmp_path / "cache")
    shard = sorted(cache.glob("shard-*.h5"))[2]
    with h5py.File(shard, "r+") as f:
        f["hidden/2"][3, 5] = value
    manifest = json.loads((cache / "manifest.json").read_text())
    for entry in manifest["shards"]:
        if entry["file"] == shard.name:
            entry["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (cache / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(cli("probe", "train", cache, "--out", tmp_path / "chips", "--val-size", "4"),
                          shard.name, "hidden/2", "not finite or of magnitude")
    assert_one_line_error(cli("cache", "verify", cache), shard.name, "hidden/2")
    assert not (tmp_path / "chips").exists()


@pytest.mark.parametrize("kind", ["pipe", "device"])
@pytest.mark.parametrize("what, name, command", [
    ("cache", "shard-00001.h5", ("cache", "verify", "{dir}")),
    ("cache", "shard-00001.h5", ("probe", "train", "{dir}", "--out", "{tmp}/trained", "--val-size", "4")),
    ("cache", "manifest.json", ("cache", "info", "{dir}")),
    ("chips", "chips.json", ("select", "{dir}", "--strategy", "fixed:3")),
    ("chips", "chips.safetensors", ("select", "{dir}", "--strategy", "fixed:3")),
    ("pruned", "chiptuning.json", ("eval", "{dir}", "--data", "{data}", "--out", "{tmp}/e")),
])
def test_a_pipe_or_a_device_in_place_of_a_file_is_refused_not_read(world, tmp_path, kind, what, name, command):
    """A named pipe blocks a reader until a writer comes; /dev/zero never ends. Either, put where a
    shard or a record belongs, is one line at once (a fresh process with a timeout: a hang fails)."""
    target = copy(world[what], tmp_path / what)
    (target / name).unlink()
    if kind == "pipe":
        os.mkfifo(target / name)
    else:
        (target / name).symlink_to("/dev/zero")
    args = [str(a).format(dir=target, tmp=tmp_path, data=world["data"]) for a in command]
    assert_subprocess_one_line(run_cli(*args, timeout=120), name)
    assert not (tmp_path / "trained").exists() and not (tmp_path / "e").exists()


# -- 3. outputs are owned: stale selections, user files --------------------------------------------

def test_retraining_replaces_the_chips_and_their_selection(world, tmp_path):
    chips = copy(world["chips"], tmp_path / "chips")
    assert json.loads((chips / "selection.json").read_text())["layer"] == 3
    cascade = copy(world["chips"], tmp_path / "cascade")  # an early-exit selection goes the same way
    result = cli("select", cascade, "--strategy", "cascade:0.5")
    assert result.exit_code == 0 and (cascade / "cascade.json").exists(), result.output
    result = cli("probe", "train", world["cache"], "--val-size", "4", "--epochs", "2", "--out", cascade, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not [p for p in ("selection.json", "cascade.json", "cascade_curve.csv", "cascade.png")
                if (cascade / p).exists()]
    before = tree_digest(chips)
    train = ("probe", "train", world["cache"], "--chip", "mlp", "--hidden", "8", "--epochs", "2", "--val-size", "4",
             "--out", chips)
    assert_one_line_error(cli(*train), "already holds a chips directory", "--overwrite")
    assert tree_digest(chips) == before
    result = cli(*train, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (chips / "selection.json").exists() and not (chips / "report.md").exists()
    assert load_chips(chips).kind == "mlp"
    # no selection: prune asks for one instead of cutting at the stale layer with the wrong chip
    assert_one_line_error(cli("prune", "--model", world["model"], "--chips", chips, "--out", tmp_path / "p"),
                          "no layer to prune at")
    assert not leftovers(tmp_path)


def test_user_files_are_never_overwritten_or_deleted(world, tmp_path):
    """A foreign directory is refused (its metrics.csv kept); files the user added to an own output are
    named and kept, even with --overwrite."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.csv").write_text("my own numbers\n")
    before = tree_digest(mine)
    assert_one_line_error(cli("probe", "train", world["cache"], "--out", mine, "--val-size", "4"),
                          "is not empty and is not a chips directory")
    assert_one_line_error(cli("extract", *world["extract"][1:], "--out", mine), "not a feature cache")
    assert_one_line_error(cli("eval", world["pruned"], "--data", world["data"], "--out", mine), "not an eval directory")
    assert tree_digest(mine) == before
    assert_one_line_error(cli("probe", "train", world["cache"], "--out", world["cache"], "--val-size", "4"),
                          "it holds a feature cache")

    chips = copy(world["chips"], tmp_path / "chips")
    (chips / "NOTES.txt").write_text("why I chose layer 3\n")
    before = tree_digest(chips)
    result = cli("probe", "train", world["cache"], "--out", chips, "--val-size", "4", "--epochs", "2", "--overwrite")
    assert_one_line_error(result, "NOTES.txt", "never deleted")
    assert tree_digest(chips) == before


def test_reprune_keeps_the_users_files(world, tmp_path):
    pruned = copy(world["pruned"], tmp_path / "pruned")
    (pruned / "NOTES.txt").write_text("deployment notes\n")
    (pruned / "extra").mkdir()
    (pruned / "extra" / "keep.txt").write_text("keep me\n")
    before = tree_digest(pruned)
    prune = ("prune", "--model", world["model"], "--chips", world["chips"], "--layer", "2", "--out", pruned)
    for command in (prune, prune + ("--overwrite",)):
        assert_one_line_error(cli(*command), "NOTES.txt", "extra/", "never deleted")
    assert tree_digest(pruned) == before
    (pruned / "NOTES.txt").unlink()
    shutil.rmtree(pruned / "extra")
    assert_one_line_error(cli(*prune), "already holds a pruned checkpoint", "--overwrite")
    result = cli(*prune, "--overwrite")
    assert result.exit_code == 0, result.output
    assert read_provenance(pruned)["layer"] == 2 and not leftovers(tmp_path)


def test_outputs_get_the_permissions_the_umask_gives(world, tmp_path):
    old = os.umask(0o022)
    try:
        result = cli("prune", "--model", world["model"], "--chips", world["chips"], "--out", tmp_path / "p")
        chips = cli("probe", "train", world["cache"], "--out", tmp_path / "c", "--val-size", "4", "--epochs", "1")
    finally:
        os.umask(old)
    assert result.exit_code == 0 and chips.exit_code == 0
    for folder in (tmp_path / "p", tmp_path / "c", tmp_path / "p" / "chip"):
        assert folder.stat().st_mode & 0o777 == 0o755, folder
    for file in (tmp_path / "p" / "model.safetensors", tmp_path / "p" / "chip" / "chip.safetensors",
                 tmp_path / "c" / "chips.safetensors", tmp_path / "c" / "chips.json"):
        assert file.stat().st_mode & 0o777 == 0o644, file


_STALL_BEFORE_RENAME = """
import pathlib, sys, time
import chiptuning.prune.checkpoint as checkpoint
def stall(*args, **kwargs):
    pathlib.Path(sys.argv[-1] + ".stalled").write_text("ready")
    time.sleep(600)
checkpoint.verify_checkpoint = stall
"""


def test_a_killed_prune_leaves_nothing_the_next_run_keeps(world, tmp_path):
    out = tmp_path / "p"
    args = ("prune", "--model", world["model"], "--chips", world["chips"], "--out", out)
    proc = start_patched(_STALL_BEFORE_RENAME, *args)
    wait_for(Path(str(out) + ".stalled"), proc)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".p.tmp-")]  # the half-written checkpoint
    proc.kill()
    proc.wait()
    Path(str(out) + ".stalled").unlink()
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert not leftovers(tmp_path) and read_provenance(out)["layer"] == 3


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_an_interrupted_prune_removes_its_temporary_folder(world, tmp_path, sig, status):
    out = tmp_path / "p"
    proc = start_patched(_STALL_BEFORE_RENAME, "prune", "--model", world["model"], "--chips", world["chips"],
                         "--out", out)
    wait_for(Path(str(out) + ".stalled"), proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert_subprocess_one_line(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr),
                               "interrupted; re-run the same command", status=status)
    Path(str(out) + ".stalled").unlink()
    assert not out.exists() and not leftovers(tmp_path)


# -- two writers, interruptions ---------------------------------------------------------------------

_SLOW_SHARDS = """
import pathlib, sys, time
import chiptuning.cache.store as store
real = store.write_bytes
def slow(path, data):
    pathlib.Path(sys.argv[-1] + ".writing").write_text("ready")
    time.sleep(1.5)
    return real(path, data)
store.write_bytes = slow
"""


def test_two_extractions_into_one_cache(world, tmp_path):
    out = tmp_path / "cache"
    first = start_patched(_SLOW_SHARDS, *world["extract"], "--out", out)
    wait_for(Path(str(out) + ".writing"), first)
    assert_one_line_error(cli(*world["extract"], "--out", out), "being written by another process",
                          f"pid {first.pid}")
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stdout + stderr
    assert cli("cache", "verify", out).exit_code == 0
    recorded = {s["file"] for s in json.loads((out / "manifest.json").read_text())["shards"]}
    assert {p.name for p in out.glob("shard-*")} == recorded  # no orphan shards
    assert not (out / ".lock").exists()
    same_features(out, world["cache"])


def test_a_stale_lock_is_taken_over(world, tmp_path):
    out = copy(world["cache"], tmp_path / "cache")
    holder = subprocess.Popen([sys.executable, "-c", f"from chiptuning.outputs import DirLock; import time; "
                               f"DirLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True, env=env(), cwd="/")
    assert holder.stdout.readline().strip() == "held"
    assert_one_line_error(cli(*world["extract"], "--out", out), f"pid {holder.pid}")
    holder.kill()  # the lock stays, its process is gone: stale
    holder.wait()
    assert (out / ".lock").exists()
    result = cli(*world["extract"], "--out", out)
    assert result.exit_code == 0, result.output
    assert not (out / ".lock").exists()


def test_an_interrupted_extraction_says_how_to_resume(world, tmp_path):
    out = tmp_path / "cache"
    proc = start_patched(_SLOW_SHARDS, *world["extract"], "--out", out)
    deadline = time.monotonic() + 180  # interrupted once the manifest lists a stored shard
    while "shard-00000.h5" not in ((out / "manifest.json").read_text() if (out / "manifest.json").exists() else ""):
        assert proc.poll() is None and time.monotonic() < deadline, "no shard was stored"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert_subprocess_one_line(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr),
                               "interrupted; re-run the same command to resume", status=130)
    assert not leftovers(out) and not (out / ".lock").exists()
    # resuming reads the stored shards: a pipe put in place of one is one line, not a hang
    piped = copy(out, tmp_path / "piped")
    (piped / "shard-00000.h5").unlink()
    os.mkfifo(piped / "shard-00000.h5")
    assert_subprocess_one_line(run_cli(*world["extract"], "--out", piped, timeout=120), "shard-00000.h5")
    result = cli(*world["extract"], "--out", out)
    assert result.exit_code == 0, result.output
    same_features(out, world["cache"])


# -- 5. one line for every failure a user can cause or meet ---------------------------------------

def test_a_full_disk_in_the_cache_writer_is_one_line_and_resumes(world, tmp_path, monkeypatch):
    import chiptuning.cache.store as store

    real, calls = store.write_bytes, []

    def full(path, data):
        calls.append(path)
        if len(calls) >= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    monkeypatch.setattr(store, "write_bytes", full)
    out = tmp_path / "cache"
    assert_one_line_error(cli(*world["extract"], "--out", out), "no space left", "re-run the same command")
    assert not leftovers(out) and not (out / ".lock").exists()
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) == 1  # the finished shard is kept
    monkeypatch.setattr(store, "write_bytes", real)
    assert cli(*world["extract"], "--out", out).exit_code == 0
    same_features(out, world["cache"])


@pytest.fixture
def small_disk(tmp_path):
    """A directory on its own small tmpfs (unmounted after the test)."""
    mounts = []

    def make(name: str, size: int) -> Path:
        path = tmp_path / name
        mount_tmpfs(path, size)
        mounts.append(path)
        return path

    yield make
    for path in mounts:
        umount(path)


def test_disk_full_on_a_real_filesystem(world, small_disk):
    """extract, probe train and prune on a tmpfs too small for them: one line each, nothing
    half-written left, and the extraction resumes once there is room."""
    shard = max(p.stat().st_size for p in world["cache"].glob("shard-*.h5"))
    manifest = (world["cache"] / "manifest.json").stat().st_size
    page = 4096
    disk = small_disk("disk", (-(-shard // page) + 2 * -(-manifest // page) + 2) * page)
    out = disk / "cache"
    result = run_cli(*world["extract"], "--out", out)
    assert_subprocess_one_line(result, "no space left")
    assert not leftovers(disk) and not (out / ".lock").exists()
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    assert run_cli(*world["extract"], "--out", out).returncode == 0
    same_features(out, world["cache"])

    chips_disk = small_disk("chips-disk", 4 * page)
    assert_subprocess_one_line(run_cli("probe", "train", world["cache"], "--out", chips_disk / "chips",
                                       "--val-size", "4", "--epochs", "1"), "no space left")
    assert not any(chips_disk.iterdir())
    prune_disk = small_disk("prune-disk", 256 * page)
    assert_subprocess_one_line(run_cli("prune", "--model", world["model"], "--chips", world["chips"],
                                       "--out", prune_disk / "p"), "no space left")
    assert not any(prune_disk.iterdir())


def test_push_offline_or_without_a_token(world, monkeypatch, tmp_path):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    assert_one_line_error(cli("push", world["pruned"], "--repo-id", "me/m"), "cannot push", "HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: as offline as it gets
    assert_one_line_error(cli("push", world["pruned"], "--repo-id", "me/m"), "cannot push", "token")


def test_numeric_options_out_of_range(world, tmp_path):
    base = (*world["extract"], "--out", tmp_path / "c")
    for value in ("0", "-5"):
        assert_one_line_error(cli(*base, "--max-length", value), "--max-length", status=2)
    assert_one_line_error(cli(*base, "--max-length", "100000"), "--max-length 100000", "512 tokens")
    for args in (("--shard-size", "0"), ("--limit", "0"), ("--batch-size", "0")):
        assert_one_line_error(cli(*base, *args), args[0], status=2)
    train = ("probe", "train", world["cache"], "--out", tmp_path / "x")
    for args in (("--epochs", "0"), ("--lr", "-1"), ("--val-size", "-3"), ("--C", "0"), ("--max-memory-mb", "0")):
        assert_one_line_error(cli(*train, *args), args[0], status=2)
    assert_one_line_error(cli("prune", "--model", world["model"], "--method", "tail", "--ratio", "1.5",
                              "--out", tmp_path / "y"), "--ratio", status=2)
    assert not (tmp_path / "c").exists() and not (tmp_path / "x").exists()


def test_debug_shows_the_traceback(world, tmp_path):
    result = CliRunner().invoke(main, ["--debug", "cache", "verify", str(tmp_path / "nowhere")])
    assert result.exit_code != 0 and not isinstance(result.exception, SystemExit)  # raised, with its traceback


# -- 6. input hygiene -----------------------------------------------------------------------------

def test_a_csv_with_a_byte_order_mark(world, tmp_path):
    rows = world["rows"][:8]
    text = "id,text,label\n" + "".join(f"{r['id']},{r['text']},{r['label']}\n" for r in rows)
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    result = cli("extract", "--model", world["model"], "--data", tmp_path / "bom.csv", "--text-column", "text",
                 "--device", "cpu", "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert list(CacheReader(tmp_path / "c").example_ids) == [r["id"] for r in rows]
    (tmp_path / "bom2.csv").write_bytes(b"\xef\xbb\xbf" + text.replace("id,text,label", "text,label,id").encode())
    result = cli("extract", "--model", world["model"], "--data", tmp_path / "bom2.csv", "--text-column", "text",
                 "--device", "cpu", "--out", tmp_path / "c2")
    assert result.exit_code == 0, result.output


def test_a_template_without_a_field_is_warned_about(world, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        result = cli(*world["extract"][:5], "--template", "Classify this:", "--device", "cpu", "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert "has no {field}: every prompt is the same text" in caplog.text


def test_an_unknown_task_name_lists_the_tasks(world, tmp_path):
    result = cli("extract", "--model", world["model"], "--task", "boolqq", "--out", tmp_path / "c")
    assert_one_line_error(result, "unknown task 'boolqq'", "did you mean 'boolq'", "race-high")


def test_duplicate_labels_are_named(world, tmp_path):
    result = cli(*world["extract"], "--labels", "pos,neg,pos", "--out", tmp_path / "c")
    assert_one_line_error(result, "'pos' more than once")


# -- 7. trust every input: records, closed checkpoints, files that are not ours --------------------

def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_checkpoint_with_an_unrecorded_file_is_refused(world, tmp_path):
    """transformers applies an adapter it finds beside a model (with peft installed): a verified
    checkpoint must never pick up files its record does not list, whatever their names."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModel

    pruned = copy(world["pruned"], tmp_path / "pruned")
    base = AutoModel.from_pretrained(pruned)
    adapter = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                        init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "adapter")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(tmp_path / "adapter" / name, pruned / name)
    with pytest.raises(ChipTuningError, match="adapter_config.json.*not among the files"):
        ChipModel.from_pretrained(pruned)
    assert_one_line_error(cli("eval", pruned, "--data", world["data"], "--out", tmp_path / "e"),
                          "adapter_config.json", "not among the files")
    assert_one_line_error(cli("push", pruned, "--repo-id", "me/m"), "not among the files")
    # an attacker who also re-hashes: chip-tuning never writes an adapter, code or pickled weights
    rehash_checkpoint(pruned)
    with pytest.raises(ChipTuningError, match="never writes"):
        ChipModel.from_pretrained(pruned)
    for extra in ("modeling_evil.py", "pytorch_model.bin", "chip/extra.safetensors", "sub/dir/notes.txt"):
        case = copy(world["pruned"], tmp_path / f"case-{extra.replace('/', '-')}")
        (case / extra).parent.mkdir(parents=True, exist_ok=True)
        (case / extra).write_text("x")
        with pytest.raises(ChipTuningError, match="not among the files"):
            ChipModel.from_pretrained(case)
    # what git and the hub leave beside a model is inert and allowed
    inert = copy(world["pruned"], tmp_path / "inert")
    (inert / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    ChipModel.from_pretrained(inert)


def test_an_edited_cache_meta_is_refused(world, tmp_path):
    cache = copy(world["cache"], tmp_path / "cache")
    edit_json(cache / "manifest.json", lambda m: m["meta"].update(label_names=m["meta"]["label_names"][::-1]))
    before = tree_digest(cache)
    assert_one_line_error(cli("cache", "verify", cache), "meta", "edited after extraction")
    assert_one_line_error(cli("cache", "info", cache), "edited after extraction")
    assert_one_line_error(cli("probe", "train", cache, "--out", tmp_path / "c", "--val-size", "4"),
                          "edited after extraction")
    assert_one_line_error(cli(*world["extract"], "--out", cache), "edited after extraction")
    assert tree_digest(cache) == before and not (tmp_path / "c").exists()


@pytest.mark.parametrize("layers", ["shifted", "duplicated", "negative", "past the model", "strings", "empty"])
def test_a_chips_record_with_bad_layers_is_refused(world, tmp_path, layers):
    chips = copy(world["chips"], tmp_path / "chips")
    record = json.loads((chips / "chips.json").read_text())
    n = len(record["layers"])
    bad = {"shifted": [layer + 1 for layer in record["layers"]][:n - 1] + [record["layers"][-1]],
           "duplicated": [record["layers"][0]] + record["layers"][:-1], "negative": [-1] + record["layers"][1:],
           "past the model": record["layers"][:-1] + [99], "strings": ["a"] * n, "empty": []}[layers]
    record["layers"] = bad
    (chips / "chips.json").write_text(json.dumps(record))
    before = tree_digest(chips)
    assert_one_line_error(cli("select", chips, "--strategy", "validate"), "chips.json")
    assert_one_line_error(cli("prune", "--model", world["model"], "--chips", chips, "--layer", "2",
                              "--out", tmp_path / "p"), "chips.json")
    assert tree_digest(chips) == before and not (tmp_path / "p").exists()


def _rewrite_chips(chips: Path, change) -> None:
    """Rewrite chips.safetensors with ``change(tensors)`` and record its new sha256 (a careful editor)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(chips / "chips.safetensors"))
    change(tensors)
    save_file(tensors, str(chips / "chips.safetensors"))
    edit_json(chips / "chips.json", lambda r: r["files"].update({"chips.safetensors": hashlib.sha256(
        (chips / "chips.safetensors").read_bytes()).hexdigest()}))


@pytest.mark.parametrize("damage", ["nan weights", "wrong width", "wrong classes"])
def test_chips_that_cannot_be_the_recorded_ones_are_refused(world, tmp_path, damage):
    chips = copy(world["chips"], tmp_path / "chips")

    def change(t):
        if damage == "nan weights":
            t["weight"][2, 0, 0] = np.nan
        elif damage == "wrong width":
            for key in ("weight", "mean", "scale"):
                t[key] = np.ascontiguousarray(t[key][..., :-1])
        else:
            t["weight"], t["bias"] = t["weight"][:, :1], t["bias"][:, :1]

    _rewrite_chips(chips, change)
    assert_one_line_error(cli("select", chips, "--strategy", "validate"), "chips.safetensors")
    assert_one_line_error(cli("prune", "--model", world["model"], "--chips", chips, "--out", tmp_path / "p"),
                          "chips.safetensors")
    assert not (tmp_path / "p").exists()


def test_chips_moved_to_another_layer_are_caught_on_the_eval_cache(world, tmp_path):
    """Weights swapped between two layers (their metrics kept): the recorded eval accuracy no longer
    holds on the eval cache, and select and prune say so instead of shipping another layer's chip."""
    chips = tmp_path / "chips"
    result = cli("probe", "train", world["cache"], "--eval", world["cache"], "--out", chips, "--val-size", "4",
                 "--epochs", "3")
    assert result.exit_code == 0, result.output
    metrics = {m["layer"]: m["eval_accuracy"] for m in json.loads((chips / "metrics.json").read_text())["layers"]}
    a, b = 1, 4
    assert metrics[a] != metrics[b], metrics  # the swap must change a score for the test to mean anything

    def swap(t):
        for key in t:
            t[key][[a, b]] = t[key][[b, a]]

    _rewrite_chips(chips, swap)
    assert_one_line_error(cli("select", chips, "--strategy", f"fixed:{a}"), "scores", "its record says")
    assert_one_line_error(cli("prune", "--model", world["model"], "--chips", chips, "--layer", str(a),
                              "--out", tmp_path / "p"), f"layer {a}", "its record says")


@pytest.mark.parametrize("kind", ["external link", "soft link", "virtual dataset", "external storage"])
def test_a_shard_reading_outside_its_file_is_refused(world, tmp_path, kind):
    cache = copy(world["cache"], tmp_path / "cache")
    outside = tmp_path / "outside.h5"
    with h5py.File(outside, "w") as f:
        f.create_dataset("secret", data=np.full((8, 32), 7.0, dtype=np.float32))
    shard = cache / "shard-00000.h5"
    with h5py.File(shard, "a") as f:
        group = f["hidden"]
        shape, dtype = group["2"].shape, group["2"].dtype
        del group["2"]
        if kind == "external link":
            group["2"] = h5py.ExternalLink(str(outside), "secret")
        elif kind == "soft link":
            group["2"] = h5py.SoftLink("/hidden/3")
        elif kind == "virtual dataset":
            layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
            layout[:] = h5py.VirtualSource(str(outside), "secret", shape=(8, 32))[: shape[0]]
            group.create_virtual_dataset("2", layout)
        else:
            raw = tmp_path / "raw.bin"
            raw.write_bytes(np.zeros(shape, dtype=dtype).tobytes())
            group.create_dataset("2", shape=shape, dtype=dtype, external=[(str(raw), 0, h5py.h5f.UNLIMITED)])
    edit_json(cache / "manifest.json", lambda m: m["shards"][0].update(
        sha256=hashlib.sha256(shard.read_bytes()).hexdigest()))  # checksums agree: only the content tells
    assert_one_line_error(cli("cache", "verify", cache), "shard-00000.h5")
    assert_one_line_error(cli("probe", "train", cache, "--out", tmp_path / "c", "--val-size", "4"), "shard-00000.h5")
    assert not (tmp_path / "c").exists()


def test_select_never_replaces_a_users_report(world, tmp_path):
    chips = copy(world["chips"], tmp_path / "chips")
    (chips / "report.md").write_text("my own notes on these chips\n")
    before = tree_digest(chips)
    assert_one_line_error(cli("select", chips, "--strategy", "validate"), "report.md", "did not write")
    assert tree_digest(chips) == before
    # its own earlier report is replaced, and a cascade's files go when the next selection has none
    fresh = copy(world["chips"], tmp_path / "fresh")
    for strategy in ("cascade:0.5", "validate", "fixed:2"):
        result = cli("select", fresh, "--strategy", strategy)
        assert result.exit_code == 0, result.output
    assert not (fresh / "cascade.json").exists()
    assert json.loads((fresh / "selection.json").read_text())["layer"] == 2
    assert not leftovers(fresh)


def test_extract_never_removes_a_shard_it_did_not_write(world, tmp_path):
    cache = copy(world["cache"], tmp_path / "cache")
    stranger = cache / "shard-00042.h5"
    stranger.write_bytes(b"someone else's file")
    result = cli(*world["extract"], "--out", cache)
    assert result.exit_code == 0, result.output
    assert stranger.read_bytes() == b"someone else's file"
    assert CacheReader(cache).n_rows == len(world["rows"])  # and it is never read


def test_folders_that_look_like_temporaries_are_left_alone(world, tmp_path):
    """Only a temporary holding its own marker is ever removed: a user's folder or file whose name merely
    looks like one (a dead pid, this host's tag) is kept, byte for byte."""
    from chiptuning.outputs import clean_stale, sibling_dir

    target = tmp_path / "chips"
    real = sibling_dir(target)  # marked, made by this process: kept while it lives
    lookalike = real.with_name(real.name.replace(f"-{os.getpid()}-", "-999999-"))
    lookalike.mkdir()
    (lookalike / "precious.txt").write_text("mine\n")
    json_tmp = tmp_path / "chips.json.tmp"
    json_tmp.write_text("my scratch file\n")
    result = cli("probe", "train", world["cache"], "--out", target, "--val-size", "4", "--epochs", "1")
    assert result.exit_code == 0, result.output
    assert (lookalike / "precious.txt").read_text() == "mine\n" and json_tmp.read_text() == "my scratch file\n"
    clean_stale(target)
    assert real.exists()  # this process is alive
    # a marked temporary of a dead process is removed
    dead = real.with_name(real.name.replace(f"-{os.getpid()}-", "-999998-"))
    real.rename(dead)
    (dead / ".chiptuning-temporary").write_text(dead.name + "\n")
    clean_stale(target)
    assert not dead.exists() and lookalike.exists()


@pytest.mark.parametrize("record, change, needle", [
    ("manifest.json", lambda d: d.update(format_version="1"), "format_version"),
    ("manifest.json", lambda d: d.update(format_version=99), "newer chip-tuning"),
    ("manifest.json", lambda d: d.update(hidden_size="32"), "hidden_size"),
    ("manifest.json", lambda d: d.update(layers=[]), "layers"),
    ("manifest.json", lambda d: d["shards"][0].update(rows=-5), "rows"),
    ("manifest.json", lambda d: d["shards"][0].update(file="../../etc/passwd"), "file"),
    ("chips.json", lambda d: d.update(n_classes=-1), "n_classes"),
    ("chips.json", lambda d: d.update(n_classes=3), "n_classes"),
    ("chips.json", lambda d: d.update(hidden_size="wide"), "hidden_size"),
    ("chips.json", lambda d: d.update(chip="svm"), "chip"),
    ("chips.json", lambda d: d.update(params={"device": {"evil": 1}}), "params"),
    ("metrics.json", lambda d: d["layers"][0].update(val_accuracy=1.5), "val_accuracy"),
    ("metrics.json", lambda d: d["layers"][0].update(val_accuracy="high"), "val_accuracy"),
    ("metrics.json", lambda d: d.update(layers="all"), "layers"),
    ("selection.json", lambda d: d.update(layer="3"), "layer"),
    ("selection.json", lambda d: d.update(cascade=[1, 2]), "cascade"),
    ("selection.json", lambda d: d.update(cascade="cascade"), "cascade"),
    ("selection.json", lambda d: d.update(cascade={"layers": [1, 3], "thresholds": [2.0, 0.0], "delta": 0.1,
                                                   "reference_layer": 3}), "thresholds"),
])
def test_malformed_records_are_one_line(world, tmp_path, record, change, needle):
    cache = copy(world["cache"], tmp_path / "cache")
    chips = copy(world["chips"], tmp_path / "chips")
    path = (cache if record == "manifest.json" else chips) / record
    edit_json(path, change)
    if record == "manifest.json":
        for command in (("cache", "info", cache), ("cache", "verify", cache),
                        ("probe", "train", cache, "--out", tmp_path / "c", "--val-size", "4")):
            assert_one_line_error(cli(*command), record, needle)
    else:
        assert_one_line_error(cli("prune", "--model", world["model"], "--chips", chips, "--out", tmp_path / "p"),
                              record, needle)
    assert not (tmp_path / "c").exists() and not (tmp_path / "p").exists()


def test_huge_or_deeply_nested_records_are_refused_before_parsing(world, tmp_path, monkeypatch):
    chips = copy(world["chips"], tmp_path / "chips")
    (chips / "selection.json").write_text("[" * 50_000 + "]" * 50_000)
    assert_one_line_error(cli("prune", "--model", world["model"], "--chips", chips, "--out", tmp_path / "p"),
                          "nests lists and objects deeper")
    monkeypatch.setattr("chiptuning.records.MAX_RECORD_BYTES", 1000)
    assert_one_line_error(cli("cache", "info", world["cache"]), "more than a record may be")


def test_a_checkpoint_record_of_the_wrong_shape_is_one_line(world, tmp_path):
    for change, needle in ((lambda d: d.update(dtype="float64"), "dtype"),
                           (lambda d: d["tasks"][d["default_task"]].update(cascade=[1]), "cascade"),
                           (lambda d: d["tasks"][d["default_task"]].update(layer=-1), "layer"),
                           (lambda d: d.update(default_task="nope"), "default_task"),
                           (lambda d: d["tokenizer"].update(max_length=0), "max_length")):
        pruned = copy(world["pruned"], tmp_path / f"p{needle}")
        edit_json(pruned / PROVENANCE_FILE, change)
        rehash_checkpoint(pruned)
        assert_one_line_error(cli("eval", pruned, "--data", world["data"], "--out", tmp_path / "e"), needle)
        with pytest.raises(ChipTuningError, match=needle):
            ChipModel.from_pretrained(pruned)


def test_careless_labels_are_named(world, tmp_path):
    rows = [dict(r) for r in world["rows"]]
    rows[5]["label"] = None
    data = write_jsonl(tmp_path / "null.jsonl", rows)
    assert_one_line_error(cli("extract", "--model", world["model"], "--data", data, "--text-column", "text",
                              "--out", tmp_path / "c"), "record 5", "no label (null)")
    rows[5]["label"] = "pos "
    data = write_jsonl(tmp_path / "space.jsonl", rows)
    assert_one_line_error(cli("extract", "--model", world["model"], "--data", data, "--text-column", "text",
                              "--out", tmp_path / "c"), "'pos'", "'pos '", "differ only by case or surrounding space")
    rows[5]["label"] = "POS"
    data = write_jsonl(tmp_path / "case.jsonl", rows)
    assert_one_line_error(cli("extract", "--model", world["model"], "--data", data, "--text-column", "text",
                              "--out", tmp_path / "c"), "differ only by case")
    assert_one_line_error(cli("extract", "--model", world["model"], "--data", data, "--text-column", "text",
                              "--labels", "neg,pos", "--out", tmp_path / "c"), "record 5", "'POS'", "only by case")
    assert not (tmp_path / "c").exists()


def test_a_template_asking_for_a_huge_width_is_refused(world, tmp_path):
    for template in ("{text:>999999999}", "{text:.99999999}", "{text:{text}}", "{text.__class__}"):
        result = cli("extract", "--model", world["model"], "--data", world["data"], "--template", template,
                     "--out", tmp_path / "c")
        assert_one_line_error(result, "at most 4,096" if template.count("{") == 1 and ":" in template else "template")
    # a checkpoint's own saved template is bounded the same way at predict
    pruned = copy(world["pruned"], tmp_path / "pruned")
    edit_json(pruned / PROVENANCE_FILE, lambda d: d["tasks"][d["default_task"]].update(
        template="{text:>999999999}", text_column=None))
    rehash_checkpoint(pruned)
    clf = ChipModel.from_pretrained(pruned)
    started = time.perf_counter()
    with pytest.raises(ChipTuningError, match="at most 4,096"):
        clf.predict(["a review"])
    assert time.perf_counter() - started < 5


def test_a_chat_template_the_sandbox_refuses_is_one_line(world, tmp_path):
    model = copy(Path(world["model"]), tmp_path / "model")
    edit_json(model / "tokenizer_config.json", lambda d: d.update(
        chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}"))
    assert_one_line_error(cli("extract", "--model", model, "--data", world["data"], "--text-column", "text",
                              "--chat-template", "--out", tmp_path / "c"), "chat template")
    assert not (tmp_path / "c").exists()


def test_the_python_api_speaks_like_the_cli(world):
    clf = ChipModel.from_pretrained(world["pruned"])
    for bad, needle in ((None, "None"), (5, "int"), (b"bytes", "bytes"), ([None], "input 0 is None"),
                        ([], "no inputs"), ("", "empty"), (["ok", "   "], "input 1 is an empty text")):
        with pytest.raises(ChipTuningError, match=needle):
            clf.predict(bad)
    with pytest.raises(ChipTuningError, match="no such directory"):
        ChipModel.from_pretrained("/no/such/checkpoint")
    from chiptuning.models import load_model

    with pytest.raises(ChipTuningError, match="no such directory"):
        load_model("/no/such/model/dir")

"""Every GGUF model family that both transformers reads and the chip-tuning registry supports.

Which families those are is asked of transformers, not written down: a metadata-only GGUF file of
each llama.cpp architecture goes through ``AutoConfig`` (as :mod:`chiptuning.model_files` does), and
the model type it becomes is looked up in the registry. For each family in both, a tiny random model
is written here as a GGUF file (:mod:`tests.gguf_writer`, the way llama.cpp writes it), converted
(its weights checked against what was written), extracted, probed and pruned, and the pruned
checkpoint must reproduce its chip's cached predictions. A family either side lacks fails in one
line naming it, through the CLI too.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM
from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

from chiptuning.cache import CacheReader
from chiptuning.cli import main
from chiptuning.errors import UnsupportedModelError
from chiptuning.extract import ExtractConfig, extract
from chiptuning.model_files import resolve_gguf
from chiptuning.probe import train_chips
from chiptuning.prune import ChipModel, prune
from chiptuning.registry import get_spec
from chiptuning.tasks import load_task
from tests.conftest import SENTENCES, require_extra, sentiment_rows, write_jsonl

gguf = require_extra("gguf", "gguf")

from tests.gguf_writer import FAMILIES, byte_level_vocab, sentencepiece_vocab, write_gguf  # noqa: E402 (needs gguf)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEMPLATE = "Review: {text}\nSentiment (pos or neg):"

# -- which families transformers reads from GGUF ----------------------------------------------------

#: Metadata without which transformers cannot even build a config for these architectures (its
#: newer GGUF loader reads them whole), so a bare file cannot tell what model type they become.
PROBE_METADATA: dict[str, dict] = {
    "lfm2": {"context_length": 64, "embedding_length": 32, "feed_forward_length": 64, "block_count": 2,
             "attention.head_count": 4, "attention.head_count_kv": [0, 2], "attention.layer_norm_rms_epsilon": 1e-5,
             "shortconv.l_cache": 3, "rope.freq_base": 10000.0},
    **{arch: {"context_length": 64, "embedding_length": 32, "block_count": 4, "feed_forward_length": 64,
              "attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 8,
              "attention.layer_norm_rms_epsilon": 1e-6, "full_attention_interval": 4, "ssm.conv_kernel": 4,
              "ssm.state_size": 8, "ssm.group_count": 2, "ssm.time_step_rank": 4, "ssm.inner_size": 32,
              "rope.freq_base": 10000.0, "rope.dimension_sections": [2, 2, 0, 0], "rope.dimension_count": 4,
              "expert_feed_forward_length": 16, "expert_shared_feed_forward_length": 16, "expert_count": 2,
              "expert_used_count": 1}
       for arch in ("qwen35", "qwen35moe")},
}


def _write_probe(path: Path, arch: str) -> None:
    """A GGUF file with no tensors: the architecture, a two-token vocabulary, and any metadata the
    architecture cannot do without."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in PROBE_METADATA.get(arch, {}).items():
        if isinstance(value, list):
            writer.add_array(f"{arch}.{key}", value)
        elif isinstance(value, float):
            writer.add_float32(f"{arch}.{key}", value)
        else:
            writer.add_uint32(f"{arch}.{key}", value)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _probe_transformers() -> dict[str, str | Exception]:
    """llama.cpp architecture -> the model type transformers makes of its GGUF files, or the error
    it raises (a ValueError: it cannot read that architecture)."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    found: dict[str, str | Exception] = {}
    try:
        with tempfile.TemporaryDirectory() as folder:
            for arch in sorted(set(gguf.MODEL_ARCH_NAMES.values())):
                _write_probe(Path(folder) / f"{arch}.gguf", arch)
                try:
                    found[arch] = AutoConfig.from_pretrained(folder, gguf_file=f"{arch}.gguf").model_type
                except Exception as err:  # noqa: BLE001 - every answer is recorded, and judged below
                    found[arch] = err
    finally:
        transformers.logging.set_verbosity(verbosity)
    return found


def _registered(model_type: str) -> bool:
    try:
        get_spec(model_type)
    except UnsupportedModelError:
        return False
    return True


PROBED = _probe_transformers()
#: llama.cpp architecture -> transformers model type, for every family transformers reads from GGUF.
READ = {arch: found for arch, found in PROBED.items() if isinstance(found, str)}
#: the families transformers reads and the registry supports: each must have a tiny-model writer.
BOTH = sorted(arch for arch, model_type in READ.items() if _registered(model_type))
#: families that transformers reads but the registry lacks.
REGISTRY_LACKS = sorted(arch for arch in READ if arch not in BOTH)

#: families in BOTH that cannot work end to end, with the reason observed (each an xfail, strict).
KNOWN_BROKEN: dict[str, str] = {}


def test_the_families_are_asked_of_transformers_and_each_has_a_writer():
    unclassified = {arch: f"{type(err).__name__}: {err}" for arch, err in PROBED.items()
                    if not isinstance(err, (str, ValueError))}
    assert not unclassified, (
        "transformers knows these GGUF architectures but cannot build a config from a bare file, so "
        f"their model type is unknown; give them PROBE_METADATA: {unclassified}")
    # A refusal means transformers cannot read the family, not that the probe file was too bare: one
    # it lists, with a model type of that name, must not be refused ('deci' has no such model type).
    listed = set(GGUF_SUPPORTED_ARCHITECTURES) | set(PROBE_METADATA)
    misread = {arch: str(err).splitlines()[0] for arch, err in PROBED.items()
               if isinstance(err, ValueError) and arch in listed and arch in CONFIG_MAPPING}
    assert not misread, f"transformers refused probe files of families it reads: {misread}"
    # llama.cpp's names that transformers spells otherwise (its load_gguf_checkpoint renames)
    assert READ["qwen2moe"] == "qwen2_moe" and READ["qwen3moe"] == "qwen3_moe" and READ["gemma3"] == "gemma3_text"
    assert {"llama", "qwen2", "gemma3", "qwen3moe"} <= set(BOTH)
    missing = {arch: READ[arch] for arch in BOTH if arch not in FAMILIES}
    assert not missing, ("transformers reads these GGUF families and the registry supports them, but "
                         f"tests/gguf_writer.py FAMILIES has no tiny-model writer for them: {missing}")
    stale = sorted(set(FAMILIES) - set(BOTH))
    assert not stale, f"writers for families no longer read by transformers or in the registry: {stale}"


# -- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def gguf_cache(tmp_path_factory):
    """Conversions of this module's files in a cache of their own: every run converts them anew."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHIPTUNING_CACHE", str(tmp_path_factory.mktemp("chiptuning-cache")))
        yield


@pytest.fixture(scope="module")
def reviews(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "reviews.jsonl", sentiment_rows())


@pytest.fixture(scope="module")
def vocabs() -> dict:
    texts = SENTENCES["pos"] + SENTENCES["neg"] + [TEMPLATE.format(text="")]
    return {"gpt2": byte_level_vocab(texts), "llama": sentencepiece_vocab(texts)}


@dataclass(frozen=True)
class Written:
    arch: str
    path: Path
    expected: dict[str, torch.Tensor]


@pytest.fixture(scope="module", params=[
    pytest.param(arch, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BROKEN[arch])) if arch in KNOWN_BROKEN
    else arch
    for arch in BOTH
])
def family(request, tmp_path_factory, vocabs) -> Written:
    arch = request.param
    if arch not in FAMILIES:
        pytest.fail(f"no tiny-model writer for GGUF family {arch!r} (transformers model type {READ[arch]!r}); "
                    "add one to tests/gguf_writer.py FAMILIES")
    path = tmp_path_factory.mktemp(arch) / f"tiny-random-{arch}.gguf"
    expected = write_gguf(path, arch, READ[arch], vocabs[FAMILIES[arch].tokenizer])
    return Written(arch, path, expected)


# -- every family both support ----------------------------------------------------------------------

def test_the_family_converts_to_the_weights_written(family):
    source = resolve_gguf(family.path)
    assert source.architecture == family.arch and FAMILIES[family.arch].matrices in source.quantization
    config = AutoConfig.from_pretrained(source.path)
    assert config.model_type == READ[family.arch]
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
    state = model.state_dict()
    assert sorted(state) == sorted(family.expected)
    for name, tensor in family.expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_the_pruned_family_reproduces_its_chip_on_the_cache(family, reviews, tmp_path):
    caches = {}
    for part, split in (("train", "train[:16]"), ("eval", "train[16:]")):
        task = load_task(reviews, template=TEMPLATE, split=split)
        config = ExtractConfig(out=str(tmp_path / part), model=str(family.path), device="cpu",
                               max_tokens_per_batch="auto", batch_size=None)
        caches[part] = CacheReader(extract(config, task))
    blocks = caches["train"].num_blocks
    chips = train_chips(caches["train"], caches["eval"], chip="linear", out=tmp_path / "chips", val_size=0)
    layer = blocks // 2
    pruned = tmp_path / "pruned"
    prune(str(family.path), tmp_path / "chips", pruned, layer=layer)
    record = json.loads((pruned / "chiptuning.json").read_text())
    assert record["num_blocks"] == blocks and record["layer"] == layer
    assert record["base_model"]["source"]["architecture"] == family.arch
    clf = ChipModel.from_pretrained(pruned)
    texts = [json.loads(line)["text"] for line in reviews.read_text().splitlines()][16:]
    cached = chips.eval_predictions["predictions"][chips.layers.index(layer)]
    np.testing.assert_array_equal(clf.predict_index(texts), cached)
    features = caches["eval"].layer(layer)  # (8, H): distinct inputs, distinct features
    assert np.ptp(features, axis=0).max() > 1e-3 * np.abs(features).max()
    np.testing.assert_allclose(clf.features(texts), features, rtol=1e-4, atol=1e-5 * np.abs(features).max())


# -- families either side lacks ---------------------------------------------------------------------

def _assert_one_line_cli_error(path: Path, reviews: Path, tmp_path: Path, *needles: str) -> None:
    result = CliRunner().invoke(main, ["extract", "--model", str(path), "--data", str(reviews),
                                       "--template", TEMPLATE, "--out", str(tmp_path / "cache"), "--device", "cpu"])
    lines = [line for line in result.output.splitlines()
             if line.strip() and not line.startswith(("INFO ", "WARNING ", "DEBUG "))]
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_a_family_transformers_cannot_read_fails_in_one_line(reviews, tmp_path):
    path = tmp_path / "odd.gguf"
    _write_probe(path, "nosuchfamily")
    with pytest.raises(UnsupportedModelError, match="cannot read GGUF architecture 'nosuchfamily'") as err:
        resolve_gguf(path)
    assert "\n" not in str(err.value)
    _assert_one_line_cli_error(path, reviews, tmp_path, "odd.gguf", "'nosuchfamily'")


def test_a_family_the_registry_lacks_fails_in_one_line(reviews, tmp_path):
    assert REGISTRY_LACKS, "every family transformers reads from GGUF is in the registry: pick another test"
    arch = "mamba" if "mamba" in REGISTRY_LACKS else REGISTRY_LACKS[0]
    path = tmp_path / f"tiny-{arch}.gguf"
    _write_probe(path, arch)
    with pytest.raises(UnsupportedModelError, match="not in the chip-tuning architecture registry") as err:
        resolve_gguf(path)
    assert f"GGUF architecture {arch!r} (transformers model type {READ[arch]!r})" in str(err.value)
    assert "\n" not in str(err.value)
    _assert_one_line_cli_error(path, reviews, tmp_path, path.name, repr(arch), repr(READ[arch]))

"""Vision-language models: image data, extraction on the language model's blocks, exact pruning.

No real VLM can be installed offline, so each supported family is a tiny random model built from
its config (4 language blocks, width 32, 28-pixel images) with its real processor class (the PIL
image processor) around a real BPE tokenizer (SmolLM2's) and a chat template shaped like the family's own. The images are real: scikit-learn's
8x8 handwritten digits, upscaled and saved as an image folder.

* LLaVA-1.5 style: CLIP vision tower, MLP projector, Llama language model (``language_model``);
  the processor repeats ``<image>`` once per patch.
* Idefics3 (SmolVLM-Instruct's architecture): SigLIP-style vision model, pixel-shuffle connector,
  Llama language model (``text_model``); the processor splits each image into tiles plus a global
  view and writes row/column tokens around them, so the sequence length depends on the image size.
* Gemma 3: SigLIP vision tower, pooling projector, Gemma-3 language model (``language_model``) with
  sliding and full attention layers; the processor replaces ``<start_of_image>`` with a block of
  soft tokens and returns ``token_type_ids`` (image tokens attend to each other both ways).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chiptuning.cache import CacheReader
from chiptuning.errors import CacheError, ChipTuningError, DataError, UnsupportedModelError
from chiptuning.extract import ExtractConfig, extract
from chiptuning.features import batch_features
from chiptuning.model_files import resolve_gguf
from chiptuning.models import load_config, load_model, load_processor
from chiptuning.pipeline import default_model
from chiptuning.probe import load_chips, train_chips
from chiptuning.probe.cascade import exit_probabilities, simulate
from chiptuning.prune import ChipModel, prune, read_provenance
from chiptuning.registry import VISION_LANGUAGE, get_blocks, get_spec, num_blocks
from chiptuning.tasks import DEFAULT_IMAGE_PROMPT, ImageRef, image_chat_prompt, load_task
from chiptuning.vision import ImageInputs
from tests.conftest import write_jsonl
from tests.test_cascade import _force_exits
from tests.test_cli_end_to_end import assert_one_line_error, cli, tree_digest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = ["llava", "idefics3", "gemma3"]
#: Where each family keeps its language model, and the class its pruned backbone reloads as.
LANGUAGE_MODEL = {"llava": "language_model", "idefics3": "text_model", "gemma3": "language_model"}
BASE_CLASS = {"llava": "LlavaModel", "idefics3": "Idefics3Model", "gemma3": "Gemma3Model"}
L = 4
N_IMAGES = 200
SIDE = 28

LLAVA_CHAT = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
              "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
              "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
GEMMA3_CHAT = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{% for c in m['content'] %}"
               "{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
               "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
IDEFICS3_CHAT = ("<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}:{% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}<image>{% else %} {{ c['text'] }}{% endif %}{% endfor %}"
                 "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")


# -- tiny random VLMs and the digits ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir() -> str:
    """A real BPE tokenizer: SmolLM2's, in the directory its GGUF file converts to (once, shared
    with the other tests through CHIPTUNING_CACHE)."""
    try:
        gguf_file = default_model()
    except ChipTuningError as err:
        pytest.skip(str(err))
    pytest.importorskip("gguf", reason="GGUF files need the gguf package: pip install 'chip-tuning[gguf]'")
    return str(resolve_gguf(gguf_file).path)


def build_vlm(family: str, tokenizer_dir: str, out: Path, seed: int = 0) -> str:
    """A tiny random ``family`` VLM (``*ForConditionalGeneration``) saved with its processor."""
    import transformers as tf
    from transformers import AutoTokenizer

    # Gemma 3's processor reads its image tokens from tokenizer attributes.
    extra = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, **({"extra_special_tokens": extra} if family == "gemma3" else {}))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    text = dict(vocab_size=0, hidden_size=32, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    if family == "llava":
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
        image_processor = LlavaImageProcessorPil(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})
        # 14-pixel patches: 4 image tokens (+ CLS, which the "default" strategy drops).
        processor = tf.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                      vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                      chat_template=LLAVA_CHAT)
        text["vocab_size"] = len(tokenizer)
        config = tf.LlavaConfig(
            vision_config=tf.CLIPVisionConfig(image_size=SIDE, patch_size=14, **vision),
            text_config=tf.LlamaConfig(**text), image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            vision_feature_layer=-1, vision_feature_select_strategy="default")
        model_class = tf.LlavaForConditionalGeneration
    elif family == "idefics3":
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        tiles = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
        tokenizer.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>",
                                                                    "<end_of_utterance>", "<global-img>", *tiles]})
        # Images are resized to a 56-pixel longest edge and split into 28-pixel tiles plus a global view;
        # each view is 4x4 patches, pixel-shuffled (scale 2) into 4 image tokens.
        image_processor = Idefics3ImageProcessorPil(do_image_splitting=True, size={"longest_edge": 2 * SIDE},
                                                    max_image_size={"longest_edge": SIDE})
        processor = tf.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                         chat_template=IDEFICS3_CHAT)
        text["vocab_size"] = len(tokenizer)
        config = tf.Idefics3Config(vision_config=dict(image_size=SIDE, patch_size=7, **vision),
                                   text_config=dict(model_type="llama", **text), scale_factor=2,
                                   image_token_id=processor.image_token_id)
        model_class = tf.Idefics3ForConditionalGeneration
    elif family == "gemma3":
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
        image_processor = Gemma3ImageProcessorPil(size={"height": SIDE, "width": SIDE})
        processor = tf.Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4,
                                       chat_template=GEMMA3_CHAT)
        text.update(vocab_size=len(tokenizer), head_dim=8, sliding_window=64,
                    layer_types=["sliding_attention", "full_attention"] * (L // 2))
        config = tf.Gemma3Config(vision_config=dict(image_size=SIDE, patch_size=14, **vision), text_config=text,
                                 mm_tokens_per_image=4, image_token_id=tokenizer.image_token_id,
                                 boi_token_id=tokenizer.boi_token_id, eoi_token_id=tokenizer.eoi_token_id)
        model_class = tf.Gemma3ForConditionalGeneration
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    if family == "gemma3":  # its projection starts at zero: no image would reach the language model
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.2)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def vlms(tokenizer_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("vlms")
    return {family: build_vlm(family, tokenizer_dir, root / family) for family in FAMILIES}


def digit_images(n: int = N_IMAGES) -> tuple[list[np.ndarray], np.ndarray]:
    """The first ``n`` of scikit-learn's 8x8 digits as SIDE x SIDE uint8 gray images, and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [np.asarray(Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((SIDE, SIDE), Image.BILINEAR))
              for img in digits.images[:n]]
    return images, digits.target[:n]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """An image folder: digits/<label>/<index>.png (10 classes)."""
    root = tmp_path_factory.mktemp("data") / "digits"
    images, labels = digit_images()
    for i, (image, label) in enumerate(zip(images, labels)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / str(label) / f"{i:04d}.png")
    return root


def copy_folder(src: Path, dst: Path) -> Path:
    for path in src.rglob("*.png"):
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    return dst


# -- the registry ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_hooks_the_language_model_blocks(family, vlms):
    model = load_model(vlms[family])
    spec = get_spec(model)
    language = LANGUAGE_MODEL[family]
    assert spec.reads_images and spec.decoder and spec.language_model == language
    assert get_blocks(model) is getattr(model, language).layers and len(get_blocks(model)) == num_blocks(model) == L
    # The registry's entry names the family's vision tower and projector.
    parts = VISION_LANGUAGE[family]
    assert isinstance(getattr(model, parts.vision), torch.nn.Module)
    assert isinstance(getattr(model, parts.projector), torch.nn.Module)
    head = load_model(vlms[family], causal_lm=True)
    assert type(head).__name__.endswith("ForConditionalGeneration") and len(get_blocks(head)) == L


def test_an_unsupported_vlm_fails_naming_it(digits, tmp_path):
    import transformers as tf

    tf.Qwen2VLConfig().save_pretrained(tmp_path / "qwen2vl")
    with pytest.raises(UnsupportedModelError, match=r"vision-language model_type 'qwen2_vl' is not supported.*llava"):
        load_config(str(tmp_path / "qwen2vl"))
    result = cli("extract", "--model", tmp_path / "qwen2vl", "--data", digits, "--out", tmp_path / "cache")
    assert_one_line_error(result, "qwen2_vl", "idefics3, llava")


# -- image data ------------------------------------------------------------------------------------


def test_image_folder_file_and_dataset_sources_agree(digits, tmp_path):
    folder = load_task(digits)
    assert folder.image_column == "image" and folder.label_names == [str(i) for i in range(10)]
    assert folder.template == DEFAULT_IMAGE_PROMPT == "What type of object is in this photo?"
    assert len(folder.examples) == N_IMAGES and folder.examples[0].id == "0/0000.png"
    assert folder.describe()["image_column"] == "image"
    # A JSONL file: image paths relative to the file, a label column.
    rows = [{"path": ex.id, "label": folder.label_names[ex.label]} for ex in folder.examples]
    data = write_jsonl(digits / "index.jsonl", rows)
    jsonl = load_task(data, image_column="path", template="Which digit is this?")
    assert [ex.label for ex in jsonl.examples] == [ex.label for ex in folder.examples]
    assert jsonl.examples[3].fields["path"].read() == folder.examples[3].fields["image"].read()
    assert jsonl.format(jsonl.examples[0].fields) == "Which digit is this?"
    # A datasets.Dataset with an Image feature and ClassLabel labels (the hub path): found by itself,
    # its images read lazily from the dataset's files.
    import datasets

    paths = [str(ex.fields["image"].path) for ex in folder.examples]
    dataset = datasets.Dataset.from_dict({"image": paths, "label": [ex.label for ex in folder.examples]})
    dataset = dataset.cast_column("image", datasets.Image()).cast_column(
        "label", datasets.ClassLabel(names=[f"digit {i}" for i in range(10)]))
    hub = load_task(dataset)
    assert hub.image_column == "image" and hub.label_names[3] == "digit 3"
    assert isinstance(hub.examples[5].fields["image"], ImageRef)
    assert hub.examples[5].fields["image"].read() == folder.examples[5].fields["image"].read()
    # ... and as a Parquet file written by datasets (image bytes in the file).
    dataset.to_parquet(str(tmp_path / "digits.parquet"))
    parquet = load_task(tmp_path / "digits.parquet", image_column="image")
    assert parquet.examples[7].fields["image"].read() == folder.examples[7].fields["image"].read()
    # A text description keeps its old keys (text caches keep their fingerprints).
    assert "image_column" not in load_task(data, text_column="path").describe()


def test_image_data_mistakes_are_one_line(digits, tmp_path):
    rows = [{"path": "0/0000.png", "label": "0"}, {"path": "1/nope.png", "label": "1"}]
    with pytest.raises(DataError, match=r"record 1: image file .*1/nope.png does not exist"):
        load_task(write_jsonl(digits / "missing.jsonl", rows), image_column="path")
    with pytest.raises(DataError, match="--text-column does not apply to image data"):
        load_task(digits, text_column="text")
    with pytest.raises(DataError, match=r"subfolder\(s\) \['9'\] are not in --labels"):
        load_task(digits, labels=[str(i) for i in range(9)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no class subfolders"):
        load_task(tmp_path / "empty")


# -- extraction ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_features_do_not_depend_on_batching(family, vlms, digits):
    """The last real token of the expanded sequence, whatever the padding: images of different sizes
    (different lengths for Idefics3's tiles) give the same features batched together as alone."""
    processor = load_processor(vlms[family])
    model = load_model(vlms[family])
    images = [Image.fromarray(img) for img in digit_images(4)[0]]
    images += [images[0].resize((50, 30)), images[1].resize((20, 44))]
    prompts = [image_chat_prompt(processor, DEFAULT_IMAGE_PROMPT)] * len(images)
    inputs = ImageInputs(processor, prompts, images)
    together = batch_features(model, inputs.batch(range(len(images)))).numpy()
    alone = np.concatenate([batch_features(model, inputs.batch([i])).numpy() for i in range(len(images))])
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)
    if family == "idefics3":  # tiles: the image size changes the sequence length
        assert len(set(inputs.lengths)) > 1
    # The token read is the end of the chat template's generation prompt, after the image tokens.
    ids = inputs.token_ids(0)
    assert ids[-1] == processor.tokenizer(prompts[0], add_special_tokens=False)["input_ids"][-1]
    image_token = processor.tokenizer.convert_tokens_to_ids(getattr(processor.tokenizer, "image_token", None)
                                                            or processor.image_token)
    assert image_token in ids and len(ids) - ids[::-1].index(image_token) < len(ids) - 5


@pytest.fixture(scope="module")
def caches(vlms, digits, tmp_path_factory) -> dict:
    """Per family: a training cache and an evaluation cache of disjoint, seeded parts of the digits."""
    root = tmp_path_factory.mktemp("caches")
    task = load_task(digits)
    order = np.random.default_rng(0).permutation(len(task.examples))
    out = {}
    for family in FAMILIES:
        parts = {}
        for name, rows in (("train", order[:150]), ("eval", np.sort(order[150:]))):
            part = load_task(digits)
            part.examples = [task.examples[i] for i in rows]
            part.split = f"digits-{name}"
            config = ExtractConfig(out=str(root / family / name), model=vlms[family], device="cpu", batch_size=None,
                                   max_tokens_per_batch=256, shard_size=64)
            parts[name] = (CacheReader(extract(config, part)), part)
        out[family] = parts
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_records_processor_images_and_the_token_read(family, caches):
    reader, task = caches[family]["eval"]
    meta = reader.meta
    assert meta.model_type == family and meta.num_blocks == L and meta.hidden_size == 32
    assert meta.processor["image_processor"].endswith("ImageProcessorPil")
    assert len(meta.images_sha256) == 16 and meta.max_length is None
    assert meta.task["image_column"] == "image" and meta.lens is not None  # the LM head's label words
    assert reader.n_rows == len(task.examples) and reader.layer(L).shape == (len(task.examples), 32)
    # The end of "ASSISTANT:" / "Assistant:" / "<start_of_turn>model\n"
    assert all(entry["chip_reads"] == {"gemma3": "Ċ"}.get(family, ":") for entry in reader.manifest.preview)
    # Layer 0 reads the embedding of the same last token for every image: no information.
    assert np.ptp(reader.layer(0), axis=0).max() < 1e-6 and np.ptp(reader.layer(1), axis=0).max() > 1e-3


def test_fingerprint_covers_the_image_bytes(vlms, digits, tmp_path):
    data = copy_folder(digits, tmp_path / "digits")
    task = load_task(data, limit=12)
    config = ExtractConfig(out=str(tmp_path / "cache"), model=vlms["llava"], device="cpu", lens=False)
    first = CacheReader(extract(config, task)).fingerprint
    assert CacheReader(extract(config, load_task(data, limit=12))).fingerprint == first  # re-run: reused
    victim = task.examples[3].fields["image"].path
    Image.open(victim).transpose(Image.FLIP_LEFT_RIGHT).save(victim)  # same name, size and labels
    with pytest.raises(CacheError, match="images_sha256"):
        extract(config, load_task(data, limit=12))


# -- pruning: every family, at layers 1, L/2 and L-1 -----------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_vlm_predicts_from_raw_images_what_its_chip_predicted(family, vlms, caches, tmp_path):
    from transformers import AutoModel

    train, _ = caches[family]["train"]
    evals, eval_task = caches[family]["eval"]
    layers = [1, L // 2, L - 1]
    train_chips(train, evals, chip="linear", out=tmp_path / "chips", layers=layers, val_size=20, seed=0)
    chips = load_chips(tmp_path / "chips")
    paths = [str(ex.fields["image"].path) for ex in eval_task.examples]
    arrays = [np.asarray(Image.open(p)) for p in paths]
    base_class = BASE_CLASS[family]
    parts = VISION_LANGUAGE[family]
    full = load_model(vlms[family])
    kept = {(part, name): tensor for part in (parts.vision, parts.projector)
            for name, tensor in getattr(full, part).state_dict().items()}
    predicted = set()
    for layer in layers:
        out = tmp_path / f"pruned-{layer}"
        prune(vlms[family], tmp_path / "chips", out, layer=layer)
        backbone, info = AutoModel.from_pretrained(out, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        assert type(backbone).__name__ == base_class and num_blocks(backbone) == layer
        assert backbone.config.get_text_config().num_hidden_layers == layer
        assert not hasattr(backbone, "lm_head") and (out / "processor_config.json").is_file()
        for part in (parts.vision, parts.projector):  # the vision tower and projector stay whole
            for name, tensor in getattr(backbone, part).state_dict().items():
                torch.testing.assert_close(tensor, kept[part, name], rtol=0, atol=0)
        record = read_provenance(out)
        assert record["num_blocks"] == L and record["architecture"] == base_class
        assert 0 < record["params"]["pruning_ratio"] < 1

        clf = ChipModel.from_pretrained(out)
        cached = evals.layer(layer)
        np.testing.assert_allclose(clf.features(paths), cached, atol=1e-5, rtol=0)
        expected = chips.chip(layer).predict(cached)
        np.testing.assert_array_equal(clf.predict_index(paths), expected)  # every eval example
        np.testing.assert_array_equal(clf.predict_index(arrays), expected)  # arrays, no files
        pil = [Image.open(p) for p in paths[:5]]
        assert clf.predict(pil) == [evals.label_names[i] for i in expected[:5]]
        assert clf.predict(paths[0]) == [evals.label_names[expected[0]]]  # one image: a batch of one
        predicted |= set(expected.tolist())
    assert len(predicted) >= 3, "chips that predict one class would prove little"


@pytest.mark.parametrize("family", FAMILIES)
def test_early_exit_from_raw_images_equals_the_cascade_on_the_cache(family, vlms, caches, tmp_path):
    """A cascade over the language model's layers: rows leave the batch after the images were merged
    into the sequence, and every answer and exit layer equals the cascade simulated on the cache."""
    train, _ = caches[family]["train"]
    evals, eval_task = caches[family]["eval"]
    train_chips(train, evals, chip="linear", out=tmp_path / "chips", val_size=20, seed=0)
    cascade = _force_exits(tmp_path / "chips", {"eval": evals})
    prune(vlms[family], tmp_path / "chips", tmp_path / "pruned")
    clf = ChipModel.from_pretrained(tmp_path / "pruned")
    assert [e.layer for e in clf.cascades["custom"]] == cascade.layers
    expected, expected_exit = simulate(exit_probabilities(load_chips(tmp_path / "chips"), evals, cascade.layers),
                                       cascade.layers, cascade.thresholds)
    paths = [str(ex.fields["image"].path) for ex in eval_task.examples]
    labels, exits = clf.predict_with_exits(paths, batch_size=8)
    np.testing.assert_array_equal(exits, expected_exit)
    assert labels == [evals.label_names[i] for i in expected]
    assert len(set(exits.tolist())) >= 3  # rows really left at several layers


def test_keep_lm_head_reloads_as_image_text_to_text(vlms, caches, tmp_path):
    from transformers import AutoModelForImageTextToText

    train, _ = caches["llava"]["train"]
    train_chips(train, chip="linear", out=tmp_path / "chips", layers=[2], val_size=0)
    prune(vlms["llava"], tmp_path / "chips", tmp_path / "pruned", layer=2, keep_lm_head=True)
    model, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "pruned", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(model).__name__ == "LlavaForConditionalGeneration" and num_blocks(model) == 2


# -- the command line: run end to end, and mistakes as one line ------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_run_on_the_digits_folder_beats_the_majority_class(family, vlms, digits, tmp_path):
    out = tmp_path / "run"
    result = cli("run", "--data", digits, "--model", vlms[family], "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "run.json").read_text())
    assert summary["n_train"] == 150 and summary["n_eval"] == 50 and summary["num_blocks"] == L
    # Random vision features still separate digits: the pruned model well above a majority guess.
    assert summary["pruned_eval_accuracy"] > summary["majority_baseline"] + 0.15, summary
    assert summary["speed"] is not None and summary["zero_shot"] is not None
    # eval from raw images, with the data options of the training data
    again = cli("eval", out / "pruned", "--data", digits, "--out", tmp_path / "eval")
    assert again.exit_code == 0, again.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n_examples"] == N_IMAGES and metrics["data"]["image_column"] == "image"


def test_bad_images_and_mismatched_data_are_one_line_and_lose_nothing(vlms, digits, tiny_models, sentiment_file,
                                                                      tmp_path):
    data = copy_folder(digits, tmp_path / "digits")
    done = tmp_path / "done"
    assert cli("extract", "--model", vlms["llava"], "--data", data, "--limit", "20", "--out", done).exit_code == 0
    before = tree_digest(done)

    corrupt = data / "7" / "0007.png"
    corrupt.write_bytes(corrupt.read_bytes()[:60])  # truncated
    assert_one_line_error(cli("extract", "--model", vlms["llava"], "--data", data, "--out", tmp_path / "c1"),
                          str(corrupt), "not a readable image")
    (data / "7" / "notes.png").write_text("not an image")
    corrupt.unlink()
    assert_one_line_error(cli("extract", "--model", vlms["llava"], "--data", data, "--out", tmp_path / "c2"),
                          "notes.png", "not a readable image")
    (data / "7" / "notes.png").unlink()
    missing = write_jsonl(tmp_path / "index.jsonl", [{"img": "digits/0/0000.png", "label": "0"},
                                                     {"img": "digits/3/gone.png", "label": "3"}])
    assert_one_line_error(cli("extract", "--model", vlms["llava"], "--data", missing, "--image-column", "img",
                              "--out", tmp_path / "c3"), "gone.png", "does not exist")
    assert_one_line_error(cli("extract", "--model", tiny_models["llama"], "--data", data, "--out", tmp_path / "c4"),
                          "reads text only", "holds images", "llava")
    assert_one_line_error(cli("extract", "--model", vlms["idefics3"], "--data", sentiment_file, "--text-column",
                              "text", "--out", tmp_path / "c5"), "vision-language model (idefics3)", "holds text only")
    for failed in ("c1", "c2", "c3", "c4", "c5"):
        assert not (tmp_path / failed / "manifest.json").exists()
    assert tree_digest(done) == before  # nothing already computed was touched


def test_an_image_that_disappears_mid_extraction_resumes(vlms, digits, tmp_path, monkeypatch):
    """Checked up front, then gone when its batch comes: one line naming it, the shards written so
    far stay, and once it is back the same command resumes to the cache an uninterrupted run makes."""
    import chiptuning.extract.extractor as ex

    data = copy_folder(digits, tmp_path / "digits")
    task = load_task(data, limit=40)
    reference = CacheReader(extract(ExtractConfig(out=str(tmp_path / "ref"), model=vlms["llava"], device="cpu",
                                                  batch_size=8, shard_size=8), task))
    victim = task.examples[30].fields["image"].path
    real = ex.check_images

    def then_vanishes(images):
        result = real(images)
        victim.rename(victim.with_suffix(".bak"))
        return result

    monkeypatch.setattr(ex, "check_images", then_vanishes)
    config = ExtractConfig(out=str(tmp_path / "cache"), model=vlms["llava"], device="cpu", batch_size=8, shard_size=8)
    with pytest.raises(DataError, match=rf"image {victim} does not exist"):
        extract(config, load_task(data, limit=40))
    assert len(list((tmp_path / "cache").glob("shard-*.h5"))) >= 2  # the batches before it are kept
    monkeypatch.setattr(ex, "check_images", real)
    victim.with_suffix(".bak").rename(victim)
    resumed = CacheReader(extract(config, load_task(data, limit=40)))
    assert resumed.fingerprint == reference.fingerprint
    for layer in reference.layers:
        np.testing.assert_array_equal(resumed.layer(layer), reference.layer(layer))

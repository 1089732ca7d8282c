"""Tasks and user data: each built-in task's metric against a direct computation, and the
training loop and verbs on loaders that are not the built-in datasets."""

import math
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

import torchslim as ts
from torchslim.core.data import Data, TensorBatches
from torchslim.core.task import (
    Classification,
    Embedding,
    LanguageModel,
    Regression,
    _content_key,
    move,
    split_batch,
    task_named,
)
from torchslim.errors import ConfigError, DataError
from torchslim.evaluate.metrics import evaluate, fidelity
from torchslim.train.fit import TrainConfig, fit


class Blobs(Dataset):
    """A map-style dataset of 3 Gaussian blobs in 8 dimensions."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.x = torch.randn(n, 8, generator=g) * 0.5 + F.one_hot(self.y, 8).float() * 2

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def _mlp(out: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, out))


def test_classification_metric_is_exact_over_uneven_batches():
    model, ds = _mlp(), Blobs(103, 1)
    loader = DataLoader(ds, batch_size=10)  # last batch of 3
    expected = (model(ds.x).argmax(1) == ds.y).float().mean().item()
    assert evaluate(model, loader, Classification()) == expected
    assert ts.accuracy(model, loader) == expected
    assert fidelity(model, model, loader) == 1.0


def test_training_on_a_user_dataloader_learns():
    model = _mlp()
    data = Data(train=DataLoader(Blobs(600, 0), batch_size=32, shuffle=True), eval=DataLoader(Blobs(200, 1), 50))
    before = evaluate(model, data.eval, data.task)
    losses = fit(model, data, TrainConfig(epochs=3, lr=1e-2))
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert evaluate(model, data.eval, data.task) > max(before, 0.9)


def test_prune_and_share_run_on_a_user_dataloader():
    model = _mlp()
    data = Data(train=DataLoader(Blobs(400, 0), batch_size=32, shuffle=True), eval=DataLoader(Blobs(200, 1), 50))
    fit(model, data, TrainConfig(epochs=2, lr=1e-2))
    ts.prune_(model, ts.MagnitudePruneConfig(sparsity=0.5, steps=1, finetune=TrainConfig(epochs=1, lr=1e-3)), data=data)
    ts.share_(model, ts.ShareConfig(bits=4, finetune=TrainConfig(epochs=1, lr=1e-3)), data=data)
    w = model[0].weight
    assert (w == 0).float().mean().item() >= 0.5 and torch.unique(w[w != 0]).numel() <= 16
    assert evaluate(model, data.eval, data.task) > 0.85


class Stream(IterableDataset):
    """An iterable dataset from a generator: no length, batches made on the fly."""

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(20):
            x = torch.randn(16, 8, generator=g)
            yield x, x[:, :2].sum(1, keepdim=True)


def test_regression_on_an_iterable_dataset_without_length():
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    data = Data(
        train=DataLoader(Stream(), batch_size=None), eval=DataLoader(Stream(), batch_size=None), task=Regression()
    )
    assert data.train_steps() is None
    before = evaluate(model, data.eval, data.task)
    fit(model, data, TrainConfig(epochs=4, lr=5e-2))
    after = evaluate(model, data.eval, data.task)
    xs, ys = zip(*Stream())
    direct = F.mse_loss(model(torch.cat(xs)), torch.cat(ys)).item()
    assert after == pytest.approx(direct, rel=1e-5) and after < before / 10
    assert data.task.metric.drop(before, after) < 0  # lower is better: improving is a negative drop


class DictModel(nn.Module):
    """Takes keyword batches as Hugging Face models do: mean of embeddings under the mask."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(20, 8), nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).float()  # (B, T, 1)
        return {"logits": self.fc((self.emb(input_ids) * m).sum(1) / m.sum(1))}


def test_dict_batches_feed_keywords_and_keep_labels_out():
    torch.manual_seed(0)
    ids = torch.randint(1, 20, (6, 5))
    mask = torch.ones(6, 5, dtype=torch.long)
    mask[:3, 3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 0, 1, 1, 0])}
    model = DictModel()
    expected = (model(ids, mask)["logits"].argmax(1) == batch["labels"]).float().mean().item()
    assert evaluate(model, [batch], Classification()) == expected
    inputs, target = split_batch(batch)
    assert set(inputs) == {"input_ids", "attention_mask"} and target is batch["labels"]


def test_embedding_cosine_and_neighbour_overlap():
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    model, other = nn.Linear(8, 4), nn.Linear(8, 4)
    task = Embedding(reference=model, k=3)
    assert evaluate(model, [x], task) == pytest.approx(1.0, abs=1e-6)
    assert fidelity(model, model, [x], task) == 1.0
    cos = F.cosine_similarity(other(x), model(x), dim=-1).mean().item()
    assert evaluate(other, [x], task) == pytest.approx(cos, abs=1e-6)
    assert fidelity(other, model, [x], task) < 0.9
    with pytest.raises(DataError, match="reference="):
        evaluate(model, [x], Embedding())


def test_embedding_runs_its_reference_once_per_batch_content():
    torch.manual_seed(0)
    model, other = nn.Linear(8, 4), nn.Linear(8, 4)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    task = Embedding(reference=model)
    batches = [torch.randn(6, 8), torch.randn(6, 8)]
    first = evaluate(other, batches, task)
    assert len(calls) == 2
    assert evaluate(other, [b.clone() for b in batches], task) == first and len(calls) == 2  # same content: kept
    evaluate(other, [batches[0] + 1], task)
    assert len(calls) == 3  # new content: run again
    dicts = [{"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long)}]
    masked = {**dicts[0], "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}
    assert _content_key(dicts[0]) != _content_key(masked) and _content_key("text") is None


def test_embedding_pools_token_outputs_under_the_mask():
    out = torch.arange(2 * 3 * 2, dtype=torch.float).reshape(2, 3, 2)  # (B, T, D)
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}
    pooled = Embedding().embed(out, batch)
    assert torch.equal(pooled, torch.stack([out[0, :2].mean(0), out[1].mean(0)]))


class Uniform(nn.Module):
    """A language model that predicts every token with equal probability."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.bias = vocab, nn.Parameter(torch.zeros(vocab))

    def forward(self, input_ids, attention_mask=None):
        return self.bias.expand(*input_ids.shape, self.vocab)  # (B, T, V)


def test_language_model_perplexity_and_padding():
    ids = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[:2, 6:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    task = LanguageModel()
    assert evaluate(Uniform(50), [batch], task) == pytest.approx(50.0, rel=1e-5)
    assert task.metric.higher_is_better is False
    logits, labels = task.tokens(Uniform(50)(ids), batch)
    assert labels.numel() == 4 * 8 - 2 * 3  # shifted tokens, padding dropped
    padded = dict(batch, input_ids=ids.masked_fill(mask == 0, 7))
    assert task.score(torch.randn(4, 9, 50), padded)[1] == task.score(torch.randn(4, 9, 50), batch)[1]
    assert fidelity(Uniform(50), Uniform(50), [batch], task) == 1.0
    with pytest.raises(DataError, match="vocabulary"):
        task.check({"input_ids": ids + 60}, Uniform(50)(ids))
    assert math.isfinite(task.loss(Uniform(50)(ids), batch).item())


def test_label_and_structure_errors_say_what_to_do():
    model = _mlp()
    x = torch.randn(4, 8)
    with pytest.raises(DataError, match=r"labels run from 0 to 5 .* 3 classes"):
        Classification().check((x, torch.tensor([0, 1, 2, 5])), model(x))
    with pytest.raises(DataError, match="integer tensor"):
        Classification().check((x, torch.rand(4)), model(x))
    with pytest.raises(DataError, match="cannot feed a model"):
        split_batch((x, x, x))
    with pytest.raises(DataError, match="class labels"):
        evaluate(model, [x], Classification())
    with pytest.raises(DataError, match="no samples"):
        evaluate(model, [], Classification())
    with pytest.raises(ConfigError, match="built-in tasks"):
        task_named("segmentation")
    with pytest.raises(ConfigError, match="Task"):
        Data(train=[], eval=[], task=object())


def test_empty_training_loader_is_a_data_error():
    with pytest.raises(DataError, match="no batches"):
        fit(_mlp(), Data(train=[], eval=[]), TrainConfig(epochs=1))


def test_move_keeps_structures():
    Pair = namedtuple("Pair", "x y")
    batch = {"a": [torch.zeros(1), (torch.ones(1), 3)], "b": Pair(torch.zeros(2), "s")}
    moved = move(batch, "cpu")
    assert isinstance(moved["b"], Pair) and moved["b"].y == "s" and moved["a"][1][1] == 3


def test_tensor_batches_calibration_defaults_to_first_training_batches():
    x, y = torch.randn(10, 8), torch.arange(10) % 3
    data = Data(train=TensorBatches((x, y), 4), eval=TensorBatches((x, y), 5), calib_batches=2)
    assert [len(b[1]) for b in data.calib_loader()] == [4, 4]
    assert len(data.train) == 3 and data.example_input(2).shape == (2, 8)
    assert data.name == "user"


def _blobs_data(**kw) -> Data:
    return Data(train=DataLoader(Blobs(64, 0), batch_size=16), eval=DataLoader(Blobs(32, 1), 16), **kw)


def test_bad_data_is_refused_before_any_work():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = ts.MagnitudePruneConfig(sparsity=0.5, steps=1, finetune=TrainConfig(epochs=1))
    x = torch.randn(8, 8)
    cases = {
        "no batches": Data(train=[], eval=[(x, torch.zeros(8, dtype=torch.long))]),
        "cannot feed a model": Data(train=[(x, x, x)], eval=[(x, x, x)]),
        "NaN or Inf": Data(train=[(x.clone().fill_(math.nan), torch.zeros(8, dtype=torch.long))], eval=[]),
        "labels run from 0 to 7": Data(train=[(x, torch.arange(8))], eval=[(x, torch.arange(8))]),
        "model fails": Data(train=[(torch.randn(8, 5), torch.zeros(8, dtype=torch.long))], eval=[]),
    }
    for message, data in cases.items():
        with pytest.raises(DataError, match=message):
            ts.prune_(model, cfg, data=data)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing pruned or trained


def test_model_and_batches_on_different_devices():
    with pytest.raises(DataError, match="meta device"):
        _blobs_data().check(_mlp().to("meta"))
    batch = (torch.randn(4, 8, device="meta"), torch.zeros(4, dtype=torch.long, device="meta"))
    with pytest.raises(DataError, match="is on meta but the model is on cpu"):
        Data(train=[batch], eval=[]).check(_mlp())


def test_a_generator_is_refused_with_what_to_do_instead():
    with pytest.raises(ConfigError, match="IterableDataset"):
        Data(train=(b for b in Blobs(4, 0)), eval=[])
    _blobs_data().check(_mlp())  # a good loader passes


def test_device_arguments_resolve_or_say_what_exists():
    from torchslim.core.device import resolve_device

    assert resolve_device(None) is None and resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="'auto', 'cpu', 'cuda'"):
        resolve_device("gpu please")
    with pytest.raises(ConfigError, match="runs on 'cpu' or 'cuda'"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no usable CUDA"):
            resolve_device("cuda:0")


def test_verbs_and_load_take_a_device(tmp_path):
    model, data = _mlp(), _blobs_data()
    ts.prune_(model, ts.MagnitudePruneConfig(sparsity=0.5, steps=1), data=data, device="auto")
    path = ts.save(model, tmp_path / "m.tslim")
    restored = ts.load(path, model=_mlp(), device="cpu")
    x = torch.randn(5, 8)
    assert next(restored.parameters()).device.type == "cpu" and torch.equal(restored(x), model.cpu()(x))


def test_bf16_autocast_trains_and_fp16_needs_cuda():
    data = _blobs_data()
    model = _mlp()
    losses = fit(model, data, TrainConfig(epochs=3, lr=1e-2, precision="bf16"))
    assert losses[-1] < losses[0] and model[0].weight.dtype == torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="fp16' trains on CUDA only"):
            fit(_mlp(), data, TrainConfig(epochs=1, precision="fp16"))
    with pytest.raises(ConfigError, match="precision='int3'"):
        TrainConfig(precision="int3")


def test_auto_calibration_reports_progress():
    model, data, seen = _mlp(), _blobs_data(), []
    ts.quantize_(
        model,
        ts.QuantizeConfig(calibration="auto", calib_batches=2),
        data=data,
        progress=lambda d, t: seen.append((d, t)),
    )
    total = seen[0][1]  # auto's candidates, then bias correction's layers
    auto, bias = seen[:total], seen[total:]
    assert [d for d, _ in auto] == list(range(1, total + 1)) and all(t == total for _, t in auto)
    assert bias and [d for d, _ in bias] == list(range(1, len(bias) + 1)) and bias[-1][1] == len(bias)


def _search_config(budget: str, **kw) -> ts.SearchConfig:
    from torchslim.search.config import LatencySetting
    from torchslim.search.space import Recovery, SearchSpace

    fields = dict(
        objective="size",
        trials=3,
        space=SearchSpace(sparsity=(0.0, 0.5, 0.9), bits=(), channels=(0.0, 0.5), int8=False),
        recovery=Recovery(samples=48, epochs=1, lr=1e-2),
        final=Recovery(samples=0, epochs=1, lr=1e-2),
        latency=LatencySetting("eager", batch=8, threads=1, repeats=2),
    )
    return ts.SearchConfig(ts.Budget.parse(budget), **(fields | kw))


def _trained(model: nn.Module, data: Data, epochs: int = 20) -> nn.Module:
    fit(model, data, TrainConfig(epochs=epochs, lr=1e-2))
    return model.eval()


def test_search_takes_a_user_loader_and_judges_the_budget_on_batches_it_never_saw(tmp_path):
    train, held = DataLoader(Blobs(256, 0), batch_size=32), DataLoader(Blobs(96, 1), batch_size=16)
    data = Data(train=train, eval=held)
    model = _trained(_mlp(), data)
    report = ts.search(model, data, _search_config("5pt"), tmp_path, name="blobs")
    final = report.final
    assert report.metric["name"] == "accuracy" and report.data == {"name": "user"}
    assert report.search.trials_done == 3 and final is not None and (tmp_path / "blobs.tslim").is_file()
    # the evaluation loader's six batches split alternately: 48 samples each, neither seen twice
    assert final.accuracy_search * 48 == round(final.accuracy_search * 48) and report.baseline.accuracy_search > 0.8
    assert final.drop_holdout == pytest.approx(report.baseline.accuracy_holdout - final.accuracy_holdout)
    assert final.within_budget == (final.drop_holdout <= report.budget.max_drop)
    restored = ts.load(tmp_path / "blobs.tslim", model=_mlp())
    assert evaluate(restored, held) == pytest.approx(final.accuracy_test)


def test_search_with_a_lower_is_better_metric_takes_a_relative_budget(tmp_path):
    from torchslim.report.html import to_html, to_search_markdown

    g = torch.Generator().manual_seed(0)
    x = torch.randn(384, 8, generator=g)
    y = x @ torch.randn(8, 2, generator=g)
    pairs = list(zip(x.split(32), y.split(32)))
    data = Data(train=pairs[:8], eval=pairs[8:], task=Regression())
    model = _trained(_mlp(2), data, 40)
    with pytest.raises(ConfigError, match="points apply to a percentage.*mse.*'1%'"):
        ts.search(model, data, _search_config("1pt"), tmp_path / "pt")
    assert not (tmp_path / "pt").exists()  # refused before writing anything
    report = ts.search(model, data, _search_config("50%"), tmp_path / "rel", name="reg")
    base, max_drop = report.baseline.accuracy_search, report.budget.max_drop
    assert report.metric == {"name": "mse", "unit": "", "higher_is_better": False}
    assert max_drop == pytest.approx(0.5 * base)
    for t in report.trials:  # a drop is the rise of the error
        if t.state == "COMPLETE":
            assert t.drop == pytest.approx(t.accuracy - base, abs=1e-5)
    front = [t for t in report.trials if t.pareto]
    assert front and all(t.feasible for t in front)
    assert report.final is not None and report.final.drop_holdout == pytest.approx(
        report.final.accuracy_holdout - report.baseline.accuracy_holdout
    )
    page, md = to_html(report), to_search_markdown(report)
    assert "mse rise, held-out split (mse)" in md and "accuracy" not in md.lower().replace("mse", "")
    assert "Mse against size and latency" in page


def test_search_refuses_what_it_cannot_measure_before_any_work(tmp_path):
    class Keywords(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 3)

        def forward(self, features: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
            return self.fc(features) / temperature

    x, y = Blobs(32, 0).x, Blobs(32, 0).y
    batches = [{"features": x[i : i + 8], "labels": y[i : i + 8]} for i in range(0, 32, 8)]
    data = Data(train=batches, eval=batches)
    from torchslim.search.config import LatencySetting

    latency = _search_config("5pt", objective="latency", latency=LatencySetting("onnxruntime", batch=8, threads=1))
    with_number = [b | {"temperature": 1.0} for b in batches]  # a Python number: no compiled backend takes it
    with pytest.raises(ConfigError, match="takes dict inputs: search latency with backend='eager'"):
        ts.search(Keywords(), Data(train=with_number, eval=with_number), latency, tmp_path / "lat")
    with pytest.raises(ConfigError, match="parallel trials rebuild the model and the data"):
        ts.search(Keywords(), data, _search_config("5pt", workers=2, use_ray=True), tmp_path / "ray")
    with pytest.raises(DataError, match="no batches"):
        ts.search(Keywords(), Data(train=batches, eval=[]), _search_config("5pt"), tmp_path / "empty")
    assert not any(tmp_path.iterdir())


def test_the_lm_task_refuses_a_bidirectional_model_and_takes_a_causal_one(tiny_lm, token_batches):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    bert = transformers.BertForMaskedLM(config).eval()  # (B, T, V) logits, but every position sees every token
    batches = token_batches(1)
    data = Data(train=batches, eval=batches, task=LanguageModel())
    with pytest.raises(DataError, match=r"lets earlier positions see later tokens .*\(AutoModelForCausalLM\)"):
        data.check(bert)
    data.check(tiny_lm("llama"))
    data.check(tiny_lm("gpt2"))

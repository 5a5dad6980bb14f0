"""The training network is the checkpoint's network: its forward agrees with the inference model
(and transformers) on the same weights, and a short run writes a checkpoint both load."""

import json

import pytest
import torch

from model.cache import MLACache
from model.checkpoint import load_model
from model.config import ModelArgs
from model.train import TrainConfig, TrainNet, read_texts, split_texts, strip_gutenberg, train, windows
from tests.helpers import full_logits


@pytest.fixture(scope="module")
def tiny_state(tiny_dir):
    from safetensors.torch import load_file

    state = {}
    for f in sorted(tiny_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def test_forward_matches_inference_model(tiny_dir, tiny_state):
    args = ModelArgs.from_hf(tiny_dir / "config.json")
    net = TrainNet.from_state_dict(args, tiny_state)
    model = load_model(tiny_dir, torch.float32, progress=False)
    mtp_layer = model.mtp_layers[0]  # DeepSeek's MTP shares the embedding and head (the training net ties them)
    mtp_layer.embed_tokens.weight.copy_(model.model.embed_tokens.weight)
    mtp_layer.shared_head.head.weight.copy_(model.lm_head.weight)
    rows = [list(range(5, 29)), list(range(100, 117))]
    expected = full_logits(model, rows)
    for row, exp in zip(rows, expected, strict=True):
        logits, mtp, aux = net.forward(torch.tensor([row]))
        torch.testing.assert_close(logits[0], exp, atol=2e-4, rtol=1e-4)
        assert [layer for layer, _, _ in aux] == args.moe_layers + [args.num_hidden_layers]
        for layer, load, _ in aux:  # every routed choice counted once
            tokens = len(row) - (1 if layer == args.num_hidden_layers else 0)
            assert int(load.sum()) == tokens * args.num_experts_per_tok

        # the MTP layer: the inference module's predict on the main model's hidden states
        n = args.num_hidden_layers
        cache = MLACache(args, n + 1, 16, 4, torch.float32)
        meta = cache.build_meta([(0, 0, len(row) - 1)])
        hidden = model(torch.tensor(row[:-1]), meta, cache)
        model.prepare(meta)
        want = mtp_layer.predict(model.normed(hidden), torch.tensor(row[1:]), meta, cache.kv[n], cache.pe[n])
        torch.testing.assert_close(mtp[0], want, atol=2e-4, rtol=1e-4)


def test_state_dict_round_trip(tiny_dir, tiny_state):
    args = ModelArgs.from_hf(tiny_dir / "config.json")
    net = TrainNet.from_state_dict(args, tiny_state)
    back = net.state_dict(torch.bfloat16)
    assert set(back) == set(tiny_state)
    n = args.num_hidden_layers
    for name, t in back.items():
        if name in (f"model.layers.{n}.embed_tokens.weight", f"model.layers.{n}.shared_head.head.weight"):
            continue  # tied to the main embedding and head while training (written as copies)
        assert t.dtype == tiny_state[name].dtype, name
        assert torch.equal(t, tiny_state[name]), name
    assert torch.equal(back[f"model.layers.{n}.embed_tokens.weight"], back["model.embed_tokens.weight"])


def test_bias_update_moves_towards_the_mean():
    args = ModelArgs.from_preset("tiny")
    net = TrainNet(args)
    layer = args.moe_layers[0]
    load = torch.zeros(args.n_routed_experts, dtype=torch.long)
    load[0], load[1], load[2] = 10, 1, 5
    before = net.biases[layer].clone()
    net.update_biases([(layer, load, torch.zeros(()))], 0.01)
    delta = net.biases[layer] - before
    mean = load.float().mean()
    assert torch.equal(delta, 0.01 * torch.sign(mean - load.float()))


def test_windows_predict_every_token_once():
    ids = list(range(10, 31))
    chunks = windows(ids, 0, 8)
    assert all(c[0] == 0 and len(c) <= 8 for c in chunks)
    assert [t for c in chunks for t in c[1:]] == ids


def test_strip_gutenberg():
    text = "Header\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\nTo be.\r\n*** END OF THIS EBOOK ***\r\nLicence"
    assert strip_gutenberg(text) == "To be.\n"
    assert strip_gutenberg("Plain text\n\n") == "Plain text\n"


def _fake_data(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    lines = ["To be, or not to be, that is the question.", "Now is the winter of our discontent.",
             "All the world's a stage, and all the men and women merely players.",
             "Friends, Romans, countrymen, lend me your ears."]
    for i, name in enumerate(["macbeth_gut.txt", "lear_gut.txt", "hamlet_gut.txt", "hamlet_gut_f.txt"]):
        body = "\n".join(lines[(i + k) % 4] for k in range(200))
        (texts / name).write_text(f"*** START OF THE PROJECT GUTENBERG EBOOK ***\n{body}\n*** END OF IT ***\n")
    (texts / "metadata.txt").write_text("[hamlet_gut]\n")
    return texts


def test_read_and_split(tmp_path):
    train_texts, held = split_texts(read_texts(_fake_data(tmp_path)))
    assert sorted(held) == ["hamlet_gut.txt", "hamlet_gut_f.txt"]
    assert sorted(train_texts) == ["lear_gut.txt", "macbeth_gut.txt"]
    assert all("GUTENBERG" not in t for t in train_texts.values())


def test_short_run_writes_a_checkpoint_transformers_loads(tmp_path):
    """A few steps on a small preset: the loss falls, and transformers' DeepseekV3ForCausalLM on the
    written checkpoint gives the held-out figure the run reported."""
    transformers = pytest.importorskip("transformers")
    cfg = TrainConfig(preset="tiny", steps=40, batch_size=4, seq_len=32, eval_every=20, eval_windows=4,
                      warmup=5, lr=3e-3)
    out = tmp_path / "ckpt"
    report = train(out, cfg, _fake_data(tmp_path), progress=False)
    curve = [v for _, v in report["curves"]["train"]]
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.5
    saved = json.loads((out / "training.json").read_text())
    assert saved["held_out"]["nats_per_char"] == report["held_out"]["nats_per_char"]
    assert (out / "loss.png").stat().st_size > 1000

    # transformers on the checkpoint, the same windows: the same nats per character
    from model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    texts = split_texts(read_texts(tmp_path / "texts"))[1]
    total, chars = 0.0, 0
    for text in texts.values():
        ids = tok.encode(text, add_bos=False)
        for chunk in windows(ids, tok.bos_token_id, cfg.seq_len):
            x = torch.tensor([chunk])
            with torch.no_grad():
                logits = hf(x).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        chars += len(text)
    assert total / chars == pytest.approx(report["held_out"]["nats_per_char"], abs=2e-3)

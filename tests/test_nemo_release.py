"""NeMo's localisation follows the public release (ml-research/localizing_memorization_in_diffusion_models):
the initial selection kept when theta reaches 1 is the last one evaluated (theta = 1.25, k = 15), and the
refinement walks the layers in reverse in both stages, entries in the release's list order.

Synthetic and cheap: a fake UNet whose to_v layers are diagonal Linears (activation a_i = chosen value),
and the SSIM / noise-difference pieces replaced by a scripted "memorization" rule on the blocked set."""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch

import baselines.mitigators.nemo as nemo
from baselines.mitigators.nemo import ActivationStats, NeMo, localise, value_layers

D0 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
D1 = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"
MID = "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"
UP = "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
W = 20


def _diag(values) -> torch.nn.Linear:
    lin = torch.nn.Linear(W, W, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.diag(torch.as_tensor(values, dtype=torch.float32)))
    return lin


def _nest(path: str, leaf: torch.nn.Module) -> torch.nn.Module:
    """A module tree whose only leaf sits at ``path`` (relative), as in a diffusers UNet."""
    head, _, rest = path.partition(".")
    if not rest:
        m = torch.nn.Module()
        m.add_module(head, leaf)
        return m
    m = torch.nn.Module()
    m.add_module(head, _nest(rest, leaf))
    return m


def fake_model(acts: dict[str, list[float]]):
    """Blocks registered as diffusers does (down_blocks, up_blocks, then mid_block)."""
    unet = torch.nn.Module()
    for block in ("down_blocks", "up_blocks", "mid_block"):
        names = [n for n in acts if n.startswith(block + ".")]
        if block == "mid_block":
            (n,) = names
            unet.add_module("mid_block", _nest(n.split(".", 1)[1], _diag(acts[n])))
            continue
        ml = torch.nn.ModuleList()
        for i in sorted({int(n.split(".")[1]) for n in names}):
            (n,) = [x for x in names if int(x.split(".")[1]) == i]
            ml.append(_nest(n.split(".", 2)[2], _diag(acts[n])))
        unet.add_module(block, ml)
    return SimpleNamespace(unet=unet, counter=SimpleNamespace(rows=0),
                           encode=lambda prompts: torch.ones(len(prompts), 1, W))


class Scripted:
    """Replaces the signal: every evaluation of a blocked set logs it and returns ``rule(set)`` as its
    max SSIM over seeds; the unblocked prompt is memorized (pairwise SSIM 0.95 on all seeds)."""

    def __init__(self, monkeypatch, rule):
        self.rule, self.log, self.current = rule, [], None
        monkeypatch.setattr(nemo, "initial_noise", lambda model, cfg: torch.zeros(cfg.n_seeds, 1))
        monkeypatch.setattr(nemo, "signal_timestep", lambda model, cfg: 0)
        monkeypatch.setattr(nemo, "pairwise_max_ssim", lambda d, cfg: torch.full((len(d),), 0.95))
        monkeypatch.setattr(nemo, "ms_ssim", lambda a, b, cfg: b[:, 0])
        monkeypatch.setattr(nemo, "noise_diff", self.noise_diff)
        monkeypatch.setattr(nemo, "blocked", self.blocked)

    @contextlib.contextmanager
    def blocked(self, model, neurons, factor=0.0):
        self.current = frozenset(neurons)
        try:
            yield
        finally:
            self.current = None

    def noise_diff(self, model, emb, x, t):
        if self.current is None:
            return torch.ones(len(x), 1)
        self.log.append(self.current)
        return torch.full((len(x), 1), float(self.rule(self.current)))


def stats_for(layers, mean=None):
    mean = mean or {}
    return ActivationStats({n: mean.get(n, torch.zeros(W)) for n in layers}, {n: torch.ones(W) for n in layers}, 2)


def test_value_layers_are_in_forward_order():
    m = fake_model({D0: [0.1] * W, D1: [0.1] * W, UP: [0.1] * W, MID: [0.1] * W})
    assert [n for n, _ in m.unet.named_modules() if n.endswith("to_v")] == [D0, D1, UP, MID]   # diffusers' order
    assert list(value_layers(m.unet, "all")) == [D0, D1, MID, UP]       # forward: down, mid, up
    assert list(value_layers(m.unet)) == [D0, D1, MID]


def _permuted(offset: int) -> list[float]:
    """Distinct activations < 1 (z < 1: only top-k selects), top-k order != channel order."""
    perm = [(7 * i + offset) % W for i in range(W)]
    return [0.04 * (p + 1) for p in perm]


def test_capped_loop_keeps_the_theta_1_25_selection(monkeypatch):
    acts = {D0: _permuted(0), D1: _permuted(3), MID: _permuted(5), UP: [0.1] * W}
    low = min(range(W), key=lambda i: acts[D0][i])                     # D0's weakest channel ...
    mean = {D0: torch.zeros(W)}
    mean[D0][low] = -1.1                                               # ... has z = 1.14: selected only at theta = 1
    key = (D0, low)
    sc = Scripted(monkeypatch, lambda s: 0.25 if key in s else 0.875)     # blocking `key` breaks memorization
    model = fake_model(acts)
    stats = stats_for([D0, D1, MID], mean)                             # up block outside the search space
    loc = localise(model, "p", stats, tau_mem=0.5, cfg=nemo.SignalConfig(n_seeds=3))

    def top(n, k):
        return sorted(range(W), key=lambda i: -acts[n][i])[:k]

    kept = frozenset((n, i) for n in (D0, D1, MID) for i in top(n, 15))
    assert (loc.theta, loc.k) == (1.25, 15) and loc.n_initial == len(kept) == 45
    assert loc.threshold == 0.875                                        # the SSIM of the kept selection
    theta_1 = kept | {(n, i) for n in (D0, D1, MID) for i in top(n, 16)} | {key}
    assert theta_1 not in sc.log and all(key not in s for s in sc.log)  # theta = 1 is never evaluated
    initial = [s for s in sc.log[:15]]
    assert [len(s) for s in initial] == [3 * k for k in range(1, 16)]  # k = 1..15 (k = 0: nothing selected)
    assert sc.log[14] == kept
    # refinement: nothing beats the cap's threshold (0.875 < 0.875 is false), so every test is logged once
    rest = sc.log[15:]
    assert [next(n for n in (D0, D1, MID) if not any(x[0] == n for x in s)) for s in rest[:3]] == [MID, D1, D0]
    singles = [next(iter(kept - s)) for s in rest[3:]]
    assert singles == [(n, i) for n in (MID, D1, D0) for i in top(n, 15)]   # reverse layers, top-k order
    assert loc.neurons == kept and all(x[0] != UP for x in loc.neurons)


def test_refinement_walks_layers_in_reverse_and_drops_entries(monkeypatch):
    # z > 5 outliers: D0 {1}, D1 {2, 5}, MID {0, 3}; memorization is carried by {(MID, 3), (D1, 5)}
    acts = {n: [0.1] * W for n in (D0, D1, MID)}
    for n, idx in ((D0, [1]), (D1, [2, 5]), (MID, [0, 3])):
        for i in idx:
            acts[n][i] = 6.0
    carrier = {(MID, 3), (D1, 5)}
    sc = Scripted(monkeypatch, lambda s: 0.25 if carrier <= s else 0.875)
    loc = localise(fake_model(acts), "p", stats_for([D0, D1, MID]), tau_mem=0.5,
                   cfg=nemo.SignalConfig(n_seeds=3))
    assert (loc.theta, loc.k, loc.threshold, loc.n_initial) == (5.0, 0, 0.5, 5)
    assert loc.neurons == frozenset(carrier) and loc.ssim_blocked == 0.25
    first = frozenset({(D0, 1), (D1, 2), (D1, 5), (MID, 0), (MID, 3)})
    assert sc.log[0] == first
    layer_trials = [first - s for s in sc.log[1:4]]
    assert [{x[0] for x in d} for d in layer_trials] == [{MID}, {D1}, {D0}]     # (i) reverse order
    after = first - {(D0, 1)}                                          # D0 dropped (memorization kept broken)
    singles = [next(iter(after_i - s)) for after_i, s in zip(_states(after, sc.log[4:]), sc.log[4:])]
    assert singles == [(MID, 0), (MID, 3), (D1, 2), (D1, 5)]            # (ii) MID before D1 (reverse order)


def _states(start, trials):
    """The current set before each neuron-wise trial (a trial's removal is kept when memorization stays broken)."""
    cur, out = set(start), []
    for s in trials:
        out.append(frozenset(cur))
        if {(MID, 3), (D1, 5)} <= s:
            cur = set(s)
    return out


def test_duplicated_entries_follow_the_release_list_semantics(monkeypatch):
    # MID channel 0 is a z-outlier AND the top-1: at k = 1 the release lists it twice, [0, 7] + [0]. Removing
    # its first copy is a no-op (dropped, as list.remove), so it is really tested at its top-k position,
    # after channel 7. Memorization is carried by {(MID, 0), (MID, 7)}.
    acts = {n: [0.1 + 0.001 * i for i in range(W)] for n in (D0, D1, MID)}
    acts[MID][0], acts[MID][7], acts[D0][3] = 6.0, 0.05, 6.0
    mean = {MID: torch.zeros(W)}
    mean[MID][7] = -4.85                                               # z(7) = 4.9: selected from theta 4.75 on
    carrier = {(MID, 0), (MID, 7)}
    sc = Scripted(monkeypatch, lambda s: 0.25 if carrier <= s else 0.875)
    loc = localise(fake_model(acts), "p", stats_for([D0, D1, MID], mean), tau_mem=0.5,
                   cfg=nemo.SignalConfig(n_seeds=3))
    assert (loc.theta, loc.k, loc.threshold) == (4.75, 1, 0.5) and loc.neurons == frozenset(carrier)
    assert sc.log[:2] == [frozenset({(MID, 0), (D0, 3)}),
                          frozenset({(MID, 0), (MID, 7), (D0, 3), (D1, W - 1)})]
    assert loc.n_initial == 4
    assert sc.log[2:5] == [frozenset({(D0, 3), (D1, W - 1)}), frozenset({(MID, 0), (MID, 7), (D0, 3)}),
                           frozenset(carrier)]                         # (i): MID kept, D1 and D0 dropped
    assert sc.log[5:] == [frozenset({(MID, 0)}), frozenset({(MID, 7)})]   # (ii): channel 7 tested, then 0


def test_params_record_the_release_rules():
    from baselines.mitigators.nemo_c import NeMoC

    for m in (NeMo(), NeMoC()):
        p = m.params()
        assert "1.25" in p["selection_kept"] and "k = 15" in p["selection_kept"]
        assert p["refinement_layer_order"].startswith("reverse") and "both" in p["refinement_layer_order"]
        assert "top-k" in p["refinement_neuron_order"] and p["localise_rule_version"] == 2

"Contracts of the model chapter (vla_nb.model): shapes, heads, confidence, losses, policy execution, checkpoints, SB3 wrapping."
import json, math
import numpy as np
import pytest
import torch
from vla_nb import sim
from vla_nb.core import seed_everything
from vla_nb.language import CommandTokenizer, command_corpus, default_tokenizer, make_token_env
from vla_nb.data import IMAGE, TOKENS, PROPRIO, ACTION, ACTION_PAD, Normalizer
from vla_nb.model import (ModelConfig, VLANet, VLAPolicy, VLAFeaturesExtractor, FirstActionMean, TemporalEnsembler, check_inputs,
                          bin_actions, unbin_actions, bin_centers, action_loss, action_error, confidence_target,
                          discrete_action_loss, vla_loss, chunk_loss, load_weights, bounds_stats)

SMALL = dict(image_size=48, vision_channels=(8, 16, 16, 16), d_model=32, heads=2, keypoints=8, dropout=0.)


def _inputs(cfg, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, cfg.vocab_size, (B, cfg.max_tokens), generator=g); ids[:, 5:] = 0
    return torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g), ids, torch.randn(B, cfg.proprio_dim, generator=g)


@pytest.fixture(scope='module')
def tok(): return CommandTokenizer.build(command_corpus())


def _obs(S=48, seed=0):
    r = np.random.default_rng(seed)
    return dict(image=r.integers(0, 256, (S, S, 3), dtype=np.uint8), proprio=r.normal(size=15).astype(np.float32) * 0.1,
                command='pick up the red cup')


def _policy(tok, **kw):
    seed_everything(0)
    cfg = ModelConfig(**SMALL, vocab_size=tok.vocab_size)
    return VLAPolicy(VLANet(cfg), Normalizer(bounds_stats()), tok, **kw)


@pytest.mark.parametrize('head', ['continuous', 'discrete'])
def test_output_shapes_and_confidence_range(head):
    cfg = ModelConfig(**SMALL, head=head, chunk_size=5)
    net = VLANet(cfg).eval()
    a, c = net(*_inputs(cfg, B=3))
    assert a.shape == (3, 5, 7) and c.shape == (3,)
    assert ((c > 0) & (c < 1)).all()
    assert net.encode(*_inputs(cfg, B=3)).shape == (3, cfg.d_model)


def test_determinism_with_fixed_seed():
    cfg = ModelConfig(**SMALL)
    seed_everything(7); a = VLANet(cfg).eval()(*_inputs(cfg))[0]
    seed_everything(7); b = VLANet(cfg).eval()(*_inputs(cfg))[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_padding_is_invisible():
    cfg = ModelConfig(**SMALL); net = VLANet(cfg).eval()
    img, ids, pro = _inputs(cfg)
    torch.testing.assert_close(net(img, ids, pro)[0], net(img, ids[:, :7], pro)[0], atol=1e-5, rtol=0)
    assert torch.isfinite(net(img, torch.zeros_like(ids), pro)[0]).all()   # even an all-padding row stays finite


def test_discrete_confidence_is_mean_max_bin_probability():
    cfg = ModelConfig(**SMALL, head='discrete', n_bins=32)
    net = VLANet(cfg).eval(); x = _inputs(cfg, B=4)
    a, c = net(*x)
    logits = net.head(net.encode(*x))['logits']                      # (B, H, A, n_bins)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(c, p.max(-1).values.mean((1, 2)))
    torch.testing.assert_close(a, bin_centers(32, cfg.bin_range)[p.argmax(-1)])


def test_continuous_confidence_target_definition():
    pred, target = torch.zeros(2, 3, 7), torch.full((2, 3, 7), 0.4)
    target[1, 2] = 100.                                             # padded step: ignored
    pad = torch.tensor([[False, False, False], [False, False, True]])
    torch.testing.assert_close(action_error(pred, target, pad), torch.tensor([0.4, 0.4]))
    torch.testing.assert_close(confidence_target(pred, target, pad), torch.exp(torch.tensor([-0.4, -0.4])))
    torch.testing.assert_close(action_loss(pred, target, pad), torch.tensor(0.4))


def test_binning_round_trip_within_half_a_bin():
    for n, r in ((256, 3.0), (17, 1.0)):
        x = torch.linspace(-r, r, 5001)
        assert (unbin_actions(bin_actions(x, n, r), n, r) - x).abs().max() <= r / n + 1e-6
        assert bin_actions(torch.tensor([-1e6, 1e6]), n, r).tolist() == [0, n - 1]
        assert torch.equal(bin_actions(unbin_actions(torch.arange(n), n, r), n, r), torch.arange(n))


def test_discrete_loss_is_zero_for_confident_correct_logits():
    target = torch.tensor([[[0.5] * 7, [9.] * 7]]); pad = torch.tensor([[False, True]])
    lg = torch.zeros(1, 2, 7, 256); lg[..., int(bin_actions(torch.tensor(0.5)))] = 50.
    assert discrete_action_loss(lg, target, pad) < 1e-6
    assert discrete_action_loss(torch.zeros(1, 2, 7, 256), target, pad) == pytest.approx(math.log(256), rel=1e-5)


@pytest.mark.parametrize('head', ['continuous', 'discrete'])
def test_loss_decreases_on_a_fixed_batch(head):
    cfg = ModelConfig(**SMALL, head=head, chunk_size=4); seed_everything(0)
    net = VLANet(cfg); opt = torch.optim.AdamW(net.parameters(), 3e-3)
    img, ids, pro = _inputs(cfg, B=8)
    batch = {IMAGE: img, TOKENS: ids, PROPRIO: pro, ACTION: torch.randn(8, 4, 7).clamp(-2, 2), ACTION_PAD: torch.zeros(8, 4, dtype=torch.bool)}
    losses = []
    for _ in range(25):
        loss, m = vla_loss(net, batch); opt.zero_grad(); loss.backward(); opt.step(); losses.append(m['action_loss'])
    assert losses[-1] < 0.7 * losses[0]


def test_normalization_round_trip(tok):
    pol = _policy(tok); norm = pol.norm
    x = torch.randn(5, 7)
    torch.testing.assert_close(norm.normalize(ACTION, norm.unnormalize(ACTION, x)), x)
    # the policy's chunk is the network's normalized output mapped back with the action statistics, clipped to [-1, 1]
    obs = _obs(); chunk = pol.predict_action_chunk(obs)
    img, ids, pro, _, _ = pol._tensors(obs)
    with torch.no_grad(): raw = norm.unnormalize(ACTION, pol.net(img, ids, pro)[0][0]).clamp(-1, 1)
    np.testing.assert_allclose(chunk, raw.numpy(), atol=1e-6)
    assert chunk.shape == (8, 7) and np.abs(chunk).max() <= 1


def test_check_inputs_names_the_problem():
    cfg = ModelConfig(**SMALL); img, ids, pro = _inputs(cfg)
    check_inputs(img, ids, pro, cfg)
    cases = [((img.to(torch.uint8), ids, pro), 'uint8'), ((img[:, :, :40], ids, pro), 'shape'),
             ((img.permute(0, 2, 3, 1), ids, pro), 'channels last'), ((img * 255, ids, pro), 'out of range'),
             ((img, ids.int(), pro), 'int64'), ((img, ids + cfg.vocab_size, pro), 'outside the vocabulary'),
             ((img, -ids, pro), 'outside the vocabulary'), ((img, torch.zeros_like(ids), pro), 'no tokens'),
             ((img, ids, pro * float('nan')), 'proprio contains NaN'), ((img, ids, pro[:, :3]), 'proprio'),
             ((img, ids[:1], pro), 'batch sizes differ')]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg): check_inputs(*args, cfg)


def test_policy_rejects_bad_observations(tok):
    pol, obs = _policy(tok), _obs()
    with pytest.raises(ValueError, match='uint8'): pol.predict_action_chunk({**obs, 'image': obs['image'] / 255.})
    np.testing.assert_array_equal(pol.predict_action_chunk({**obs, 'image': np.full((32, 32, 3), 90, np.uint8)}),
                                  pol.predict_action_chunk({**obs, 'image': np.full((48, 48, 3), 90, np.uint8)}))   # resized like a camera frame
    with pytest.raises(ValueError, match='3 RGB channels'): pol.predict_action_chunk({**obs, 'image': np.zeros((48, 48, 4), np.uint8)})
    with pytest.raises(ValueError, match='NaN'): pol.predict_action_chunk({**obs, 'proprio': np.full(15, np.nan, np.float32)})
    with pytest.raises(ValueError, match='lacks'): pol.predict_action_chunk({'image': obs['image']})
    with pytest.raises(ValueError, match='empty'): pol.predict_action_chunk({**obs, 'command': '  '})


def test_select_action_executes_chunk_step_by_step_and_reset_clears(tok):
    pol, obs = _policy(tok, n_action_steps=3), _obs()
    chunk = pol.predict_action_chunk(obs)
    for k in range(3): np.testing.assert_allclose(pol.select_action(obs), chunk[k], atol=1e-6)
    assert len(pol._queue) == 0
    pol.select_action(obs); assert len(pol._queue) == 2              # refilled with a new chunk
    pol.reset(); assert len(pol._queue) == 0
    with pytest.raises(ValueError, match='n_action_steps'): _policy(tok, n_action_steps=9)


def test_queue_does_not_requery_until_empty(tok):
    pol, calls = _policy(tok, n_action_steps=4), []
    orig = pol.net.forward
    pol.net.forward = lambda *a: calls.append(1) or orig(*a)
    for _ in range(8): pol.select_action(_obs())
    assert len(calls) == 2


def test_temporal_ensembling_hand_example():
    ens = TemporalEnsembler(math.log(2), 3)                          # weights 1, 1/2, 1/4 (oldest first)
    out = [float(ens.update(np.full((3, 1), 3. * k))[0]) for k in range(4)]
    np.testing.assert_allclose(out, [0, (0 + 1.5) / 1.5, (0 + 1.5 + 1.5) / 1.75, (3 + 3 + 2.25) / 1.75])
    ens.reset(); assert float(ens.update(np.full((3, 1), 5.))[0]) == 5.
    # a chunk that differs per step: step 1 averages chunk0[1] and chunk1[0] with weights 1 and exp(-m)
    m = 0.3; e = TemporalEnsembler(m, 2)
    e.update(np.array([[1.], [2.]])); a = e.update(np.array([[4.], [8.]]))
    np.testing.assert_allclose(a, [(2 + 4 * math.exp(-m)) / (1 + math.exp(-m))])


def test_policy_with_ensembling_queries_every_step(tok):
    pol = _policy(tok, temporal_ensemble_coeff=0.01); obs = _obs()
    a0 = pol.select_action(obs)
    np.testing.assert_allclose(a0, pol.predict_action_chunk(obs)[0], atol=1e-6)
    a1 = pol.select_action(obs); c = pol.predict_action_chunk(obs)
    np.testing.assert_allclose(a1, (c[1] + math.exp(-0.01) * c[0]) / (1 + math.exp(-0.01)), atol=1e-6)
    with pytest.raises(ValueError, match='ensembling'): _policy(tok, temporal_ensemble_coeff=0.01, n_action_steps=4)


def test_policy_rolls_out_in_the_simulator(tok):
    pol = _policy(tok)
    env = sim.TabletopEnv(sim.SimConfig(image_size=48, max_steps=10))
    r = sim.rollout(env, pol, seed=0)
    first, _ = env.reset(seed=0)
    env.close()
    assert r['steps'] == 10 and r['actions'].shape == (10, 7) and np.abs(r['actions']).max() <= 1
    np.testing.assert_allclose(r['actions'][:8], pol.predict_action_chunk(first), atol=1e-6)   # the first chunk, executed in order
    assert not np.allclose(r['actions'][8], r['actions'][7])                # then a new chunk from a new observation


def test_checkpoint_round_trip(tok, tmp_path):
    pol = _policy(tok, n_action_steps=5); obs = _obs()
    pol.save(tmp_path/'p.safetensors')
    back = VLAPolicy.load(tmp_path/'p.safetensors')
    np.testing.assert_array_equal(back.predict_action_chunk(obs), pol.predict_action_chunk(obs))
    assert back.cfg == pol.cfg and back.n_action_steps == 5 and back.tokenizer.to_json() == tok.to_json()
    meta = json.loads((tmp_path/'p.json').read_text())['meta']
    assert set(meta) >= {'config', 'stats', 'tokenizer'}


def test_checkpoint_mismatch_and_corruption(tok, tmp_path):
    pol = _policy(tok); p = tmp_path/'p.safetensors'; pol.save(p)
    with pytest.raises(ValueError, match='d_model'): VLAPolicy.load(p, config=pol.cfg.replace(d_model=64))
    with pytest.raises(ValueError, match='does not match the model config'): load_weights(VLANet(pol.cfg.replace(chunk_size=4)), pol.net.state_dict())
    with pytest.raises(ValueError, match=r"unexpected \['head.conf"): load_weights(VLANet(pol.cfg.replace(head='discrete')), pol.net.state_dict())
    with pytest.raises(ValueError, match=r"missing \['head.conf"): load_weights(pol.net, VLANet(pol.cfg.replace(head='discrete')).state_dict())
    side = tmp_path/'p.json'; info = json.loads(side.read_text())          # a sidecar whose config no longer fits the weights
    info['meta']['config']['chunk_size'] = 3; side.write_text(json.dumps(info))
    with pytest.raises(ValueError, match='head.mlp.2'): VLAPolicy.load(p)
    pol.save(p); p.write_bytes(p.read_bytes()[:500])
    with pytest.raises(ValueError, match='corrupt checkpoint'): VLAPolicy.load(p)


def test_sb3_extractor_builds_and_learns():
    "PPO on the token env trains the VLANet inside the extractor: finite losses, changed weights, a changed policy."
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    venv = make_vec_env(make_token_env, n_envs=1, seed=0, env_kwargs=dict(image_size=48, max_steps=16))
    cfg = ModelConfig(**SMALL)
    ppo = PPO('MultiInputPolicy', venv, n_steps=32, batch_size=16, n_epochs=2, learning_rate=1e-3, seed=0, device='cpu',
              policy_kwargs=dict(features_extractor_class=VLAFeaturesExtractor, features_extractor_kwargs=dict(config=cfg)))
    ext = ppo.policy.features_extractor
    assert isinstance(ext, VLAFeaturesExtractor) and ext.features_dim == cfg.d_model
    assert ext.net.cfg.vocab_size >= default_tokenizer().vocab_size and ext.net.cfg.image_size == 48
    before = {k: v.clone() for k, v in ext.net.state_dict().items()}
    obs = ppo.policy.obs_to_tensor(venv.reset())[0]
    with torch.no_grad(): mean0 = ppo.policy.get_distribution(obs).distribution.mean.clone()
    ppo.learn(64)
    logged = ppo.logger.name_to_value                                       # the last update's statistics
    for k in ('train/loss', 'train/value_loss', 'train/policy_gradient_loss', 'train/entropy_loss', 'train/approx_kl'):
        assert math.isfinite(logged[k]), (k, logged[k])
    assert logged['train/value_loss'] > 0 and logged['train/approx_kl'] > 0 and logged['train/n_updates'] == 4
    changed = {k for k, v in ext.net.state_dict().items() if not torch.equal(v, before[k])}
    for part in ('vision.', 'text.', 'fuse.'):                              # gradients reach every encoder of the extractor
        assert any(k.startswith(part) for k in changed), (part, sorted(changed)[:5])
    assert not any(k.startswith('head.') for k in changed)                  # the chunk head is not part of the features
    assert all(torch.isfinite(v).all() for v in ext.net.state_dict().values())
    with torch.no_grad(): mean1 = ppo.policy.get_distribution(obs).distribution.mean
    assert (mean1 - mean0).abs().max() > 1e-4                               # the policy's action changed
    assert set(ext.net.state_dict()) == set(VLANet(ext.net.cfg).state_dict())   # a plain VLANet's weights load unchanged
    load_weights(ext.net, VLANet(ext.net.cfg).state_dict())
    venv.close()


def test_first_action_mean_shares_the_head():
    net = VLANet(ModelConfig(**SMALL)); f = torch.randn(4, 32)
    m = FirstActionMean(net.head, action_mean=np.full(7, 0.1), action_std=np.full(7, 0.5))
    torch.testing.assert_close(m(f), net.head(f)['actions'][:, 0] * 0.5 + 0.1)
    assert m.head is net.head
    with pytest.raises(ValueError, match='ContinuousHead'): FirstActionMean(VLANet(ModelConfig(**SMALL, head='discrete')).head)


def test_config_validation():
    with pytest.raises(ValueError, match='head'): ModelConfig(head='diffusion')
    with pytest.raises(ValueError, match='divisible'): ModelConfig(d_model=100, heads=3)
    with pytest.raises(ValueError, match='n_bins'): ModelConfig(n_bins=1)
    with pytest.raises(ValueError, match='vision_channels'): ModelConfig(vision_channels=(8,))
    assert ModelConfig.from_dict(json.loads(json.dumps(ModelConfig(head='discrete').to_dict()))) == ModelConfig(head='discrete')


def test_confidence_probe_sends_no_gradient_into_the_encoder():
    net = VLANet(ModelConfig(**SMALL)); _, c = net(*_inputs(net.cfg))
    c.sum().backward()
    assert all(p.grad is None for p in net.text.parameters()) and all(p.grad is None for p in net.head.mlp.parameters())
    assert net.head.conf.weight.grad.abs().sum() > 0 and net.head.conf.bias.grad.abs().sum() > 0


@pytest.mark.parametrize('head', ['continuous', 'discrete'])
def test_trace_and_onnx_match_eager(head, tmp_path):
    import warnings
    import onnxruntime as ort
    cfg = ModelConfig(**SMALL, head=head); seed_everything(0); net = VLANet(cfg).eval()
    x2, x3 = _inputs(cfg, B=2), _inputs(cfg, B=3, seed=1)
    with torch.no_grad():
        ref = net(*x3)
        for a, b in zip(torch.jit.trace(net, x2)(*x3), ref): torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        names = ['image', 'token_ids', 'proprio']
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', DeprecationWarning)
            torch.onnx.export(net, x2, str(tmp_path/'m.onnx'), dynamo=False, opset_version=17, input_names=names,
                              output_names=['actions', 'confidence'], dynamic_axes={k: {0: 'batch'} for k in names + ['actions', 'confidence']})
    out = ort.InferenceSession(str(tmp_path/'m.onnx'), providers=['CPUExecutionProvider']).run(None, {k: v.numpy() for k, v in zip(names, x3)})
    for a, b in zip(out, ref): np.testing.assert_allclose(a, b.numpy(), atol=1e-4)


def test_chunk_loss_is_the_one_objective():
    "Continuous: masked L1 + BCE of the confidence logit against exp(-error); discrete: bin cross-entropy, no confidence term."
    cfg = ModelConfig(**SMALL, chunk_size=2)
    target = torch.tensor([[[0.5] * 7, [1.0] * 7]]); pad = torch.tensor([[False, True]])
    out = dict(actions=torch.zeros(1, 2, 7), confidence_logit=torch.tensor([0.0]))
    t = chunk_loss(out, target, pad, cfg)
    assert set(t) == {'action_loss', 'confidence_loss'}
    assert t['action_loss'].item() == pytest.approx(0.5)                      # the padded step's error is not counted
    p = math.exp(-0.5)                                                      # target confidence; predicted sigmoid(0) = 1/2
    assert t['confidence_loss'].item() == pytest.approx(-(p * math.log(0.5) + (1 - p) * math.log(0.5)), rel=1e-5)
    out['confidence_logit'] = torch.tensor([math.log(p / (1 - p))])        # the right confidence: the BCE's minimum
    lo = chunk_loss(out, target, pad, cfg)['confidence_loss'].item()
    assert lo == pytest.approx(-(p * math.log(p) + (1 - p) * math.log(1 - p)), rel=1e-5) and lo < t['confidence_loss'].item()
    acts, logit = torch.zeros(1, 2, 7, requires_grad=True), torch.tensor([0.3], requires_grad=True)
    chunk_loss(dict(actions=acts, confidence_logit=logit), target, pad, cfg)['confidence_loss'].backward()
    assert acts.grad is None and logit.grad.abs().item() > 0               # the confidence term trains the logit, not the actions
    d = chunk_loss(dict(logits=torch.zeros(1, 2, 7, 256)), target, pad, cfg.replace(head='discrete'))
    assert d['action_loss'].item() == pytest.approx(math.log(256), rel=1e-5) and d['confidence_loss'].item() == 0
    net = VLANet(cfg.replace(dropout=0.0)).eval(); x = _inputs(net.cfg)        # vla_loss is chunk_loss on the net's head
    batch = {IMAGE: x[0], TOKENS: x[1], PROPRIO: x[2], ACTION: torch.randn(2, 2, 7), ACTION_PAD: torch.zeros(2, 2, dtype=torch.bool)}
    loss, m = vla_loss(net, batch)
    terms = chunk_loss(net.head(net.encode(*x)), batch[ACTION], batch[ACTION_PAD], net.cfg)
    assert loss.item() == pytest.approx(sum(v.item() for v in terms.values()), rel=1e-6)
    assert m['action_loss'] == pytest.approx(terms['action_loss'].item(), rel=1e-6)

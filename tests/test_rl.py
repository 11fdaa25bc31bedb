"Contracts of the reinforcement-learning chapter (vla_nb.rl): the environment, an exact warm start, the stabilisers, resumable runs."
import json
import numpy as np
import pytest
import torch
from vla_nb import sim
from vla_nb.core import seed_everything
from vla_nb.data import Normalizer
from vla_nb.deployment import DeployConfig, OptimizedVLAInference, export_artifact
from vla_nb.evaluation import EvalResult
from vla_nb.language import CommandTokenizer, default_tokenizer
from vla_nb.model import ModelConfig, VLANet, VLAPolicy, bounds_stats, load_pretrained
from vla_nb.rl import (
    RLConfig,
    VLAEnvConfig,
    VLAEnvironment,
    VLAReinforcementTrainer,
    check_env_matches,
    explore_scale,
    mcnemar_p,
    paired_comparison,
)

SMALL = dict(image_size=32, vision_channels=(8, 8, 8, 8), d_model=32, heads=2, keypoints=4, text_layers=1)
ENV = VLAEnvConfig(image_size=32, wrist_size=0, max_steps=12, chunk=4)


def _policy(**kw) -> VLAPolicy:
    seed_everything(0)
    tok = default_tokenizer()
    net = VLANet(ModelConfig(**SMALL, vocab_size=tok.vocab_size, max_tokens=tok.max_len, chunk_size=4, **kw))
    return VLAPolicy(net, Normalizer(bounds_stats()), tok)


def _cfg(tmp_path, **kw) -> RLConfig:
    base = dict(n_envs=1, n_steps=4, batch_size=4, n_epochs=2, eval_every=10**6, eval_episodes=1, tensorboard=False)
    return RLConfig(env=ENV, out_dir=str(tmp_path / 'rl'), **{**base, **kw})


def test_environment_reward_chunks_and_bad_actions():
    env = VLAEnvironment(ENV.replace(completion_bonus=0.5, step_cost=0.01))
    obs, info = env.reset(seed=0)
    assert obs['command'].dtype == np.int64 and env.tokenizer.decode(obs['command']) == info['command']
    assert info['spec']['seed'] < 2**31  # training seeds never meet the evaluation seeds (>= 2**31)
    _, r, term, trunc, step = env.step(np.zeros(4 * 7, np.float32))
    assert step['sim_steps'] == 4 and step['step'] == 4 and r == pytest.approx(-0.04) and not (term or trunc)
    with pytest.raises(ValueError, match=r'shape \(28,\)'):
        env.step(np.zeros(7))
    with pytest.raises(ValueError, match='non-finite'):
        env.step(np.full(28, np.inf))
    env.close()


def test_success_reward_pays_for_time_left():
    "The scripted expert drives the RL interface: reward on success = success_reward + bonus * (1 - t / max_steps)."
    env = VLAEnvironment(VLAEnvConfig(image_size=32, wrist_size=0, chunk=1, families=('find',), completion_bonus=0.5))
    env.reset(seed=3)
    expert, done, total = sim.ScriptedExpert(env.env.unwrapped), False, 0.0
    while not done:
        _, r, term, trunc, info = env.step(expert.select_action())
        total, done = total + r, term or trunc
    assert info['is_success']
    assert total == pytest.approx(1 + 0.5 * (1 - info['step'] / 120))
    env.close()


def test_hard_episodes_are_replayed():
    spec = dict(seed=123, task=dict(family='pick', obj='book', loc=None), template=0)
    env = VLAEnvironment(ENV.replace(hard_frac=1.0), hard_episodes=[spec])
    _, info = env.reset(seed=0)
    assert info['spec'] == spec and info['command'] == 'pick up the book'
    env.close()


def test_warm_start_is_exact_and_the_residual_starts_at_zero(tmp_path):
    base = _policy()
    env = VLAEnvironment(ENV)
    obs, info = env.reset(seed=1)
    want = base.predict_action_chunk({**obs, 'command': info['command']})[:4]
    for mode in ('residual', 'direct'):
        tr = VLAReinforcementTrainer(base, _cfg(tmp_path, mode=mode))
        venv = tr.create_vla_environment()
        agent = tr.build_agent(venv)
        act, _ = agent.predict(obs, deterministic=True)
        np.testing.assert_allclose(act.reshape(4, 7), want, atol=1e-5)
        assert float(agent.policy.log_std.detach().exp().mean()) == pytest.approx(np.exp(-2.0), rel=1e-5)
        venv.close()
    trainable = {id(p) for p in agent.policy.optimizer.param_groups[0]['params']}
    assert all(id(p) in trainable for p in agent.policy.features_extractor.net.parameters())  # direct: the whole VLA
    env.close()


def test_critic_warmup_leaves_the_actor_untouched_then_the_actor_moves(tmp_path):
    base = _policy()
    tr = VLAReinforcementTrainer(base, _cfg(tmp_path, mode='direct', critic_warmup=1, explore_ramp=1))
    run = tr.finetune_with_rl(4, progress_bar=False)  # one rollout: a warm-up update only
    assert [u['warmup'] for u in run['updates']] == [True]
    after = VLAPolicy.load(run['final_policy'])
    for (k, a), b in zip(base.net.state_dict().items(), after.net.state_dict().values()):
        assert torch.equal(a, b), k
    critic0 = VLAReinforcementTrainer(base, _cfg(tmp_path / 'x', mode='direct'))
    critic0.build_agent(critic0.create_vla_environment())
    c0 = critic0.model.policy.value_net.weight
    assert not torch.equal(c0, tr.model.policy.value_net.weight)  # the critic learned
    more = VLAReinforcementTrainer(base, tr.config).finetune_with_rl(8, resume=True, progress_bar=False)
    assert [u['warmup'] for u in more['updates']] == [True, False]
    moved = VLAPolicy.load(more['final_policy'])
    assert any(not torch.equal(a, b) for a, b in zip(base.net.state_dict().values(), moved.net.state_dict().values()))


def test_explore_scale_ramps_after_the_warmup():
    c = RLConfig(critic_warmup=2, explore_start=0.2, explore_ramp=4)
    assert [explore_scale(i, c) for i in range(8)] == pytest.approx([0.2, 0.2, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    assert explore_scale(0, c.naive()) == 1.0


def test_run_variants():
    "The chapter's runs: the stabilised ones keep the stabilisers, the baselines drop them."
    c = RLConfig()
    d, n, s = c.variant('direct'), c.variant('naive'), c.variant('scratch')
    assert (d.mode, d.log_std_init, d.critic_warmup) == ('direct', c.log_std_init, c.critic_warmup)
    assert (n.mode, n.log_std_init, n.critic_warmup, n.explore_ramp) == ('residual', 0.0, 0, 0)
    assert (s.mode, s.log_std_init, s.critic_warmup) == ('scratch', 0.0, 0)
    with pytest.raises(ValueError, match="'naive'"):
        c.variant('ppo')


def test_bad_inputs_are_refused(tmp_path):
    base = _policy()
    other = VLAPolicy(base.net, base.norm, CommandTokenizer.build(['pick up the book', 'find the bottle']))
    with pytest.raises(ValueError, match='tokenizer'):
        VLAReinforcementTrainer(other, _cfg(tmp_path))
    with pytest.raises(ValueError, match="sentence encoder.*load_pretrained\\('tabletop-words'\\)"):
        check_env_matches(load_pretrained('tabletop'), VLAEnvConfig())
    with pytest.raises(ValueError, match='camera settings differ'):
        VLAReinforcementTrainer(base, _cfg(tmp_path).replace(env=ENV.replace(image_size=48)))
    tr = VLAReinforcementTrainer(base, _cfg(tmp_path, n_steps=8))
    with pytest.raises(ValueError, match='below one rollout'):
        tr.finetune_with_rl(7)
    tr.finetune_with_rl(8, progress_bar=False)
    with pytest.raises(ValueError, match="'clip_range'"):
        VLAReinforcementTrainer(base, _cfg(tmp_path, n_steps=8, clip_range=0.3)).finetune_with_rl(16, resume=True)
    changed = _policy()
    with torch.no_grad():
        changed.net.head.mlp[-1].bias.add_(0.1)
    with pytest.raises(ValueError, match='another base policy'):
        VLAReinforcementTrainer(changed, tr.config).finetune_with_rl(16, resume=True)


def test_mcnemar_and_pairing():
    assert mcnemar_p(12, 3) == pytest.approx(2 * 576 / 2**15)
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(4, 4) == 1.0
    recs = lambda flags: EvalResult([dict(seed=i, command='c', family='pick', success=bool(f)) for i, f in enumerate(flags)])
    assert paired_comparison(recs([1, 0, 0, 1]), recs([1, 1, 1, 0])) == dict(fixed=2, broken=1, paired_p_value=1.0, episodes=4)
    with pytest.raises(ValueError, match='different episodes'):
        paired_comparison(recs([1, 0]), recs([1]))


def test_residual_policy_exports_as_one_graph(tmp_path):
    pol = _policy(residual_hidden=16, residual_scale=0.3)
    with torch.no_grad():
        pol.net.head.residual.mlp[-1].bias.fill_(2.0)  # a residual that is not a no-op
    art = export_artifact(pol, tmp_path / 'art', DeployConfig(int8=False))
    meta = json.loads((art / 'deploy.json').read_text())
    assert meta['parity']['ort_fp32'] <= 1e-4 and meta['config']['residual_hidden'] == 16
    obs = dict(image=np.zeros((32, 32, 3), np.uint8), proprio=np.zeros(15, np.float32), command='find the bottle')
    ort_act = OptimizedVLAInference(art, 'ort_fp32', warmup=0).infer(obs)['actions']
    base = VLAPolicy(VLANet(pol.cfg.replace(residual_hidden=0)), pol.norm, pol.tokenizer)
    base.net.load_state_dict({k: v for k, v in pol.net.state_dict().items() if 'residual' not in k})
    np.testing.assert_allclose(ort_act, pol.predict_action_chunk(obs), atol=1e-4)
    shift = pol.predict_action_chunk(obs) - base.predict_action_chunk(obs)
    assert np.abs(shift).max() > 0.05  # the graph carries the residual, not just the base


def test_bench_harder_setting_fine_tunes_the_weaker_policy(tmp_path):
    "`harder_policy` replaces the camera shift: the harder run starts from (and keeps frozen) the weaker policy's weights."
    from vla_nb.rl import bench_rl

    base, weak = _policy(), _policy()
    with torch.no_grad():
        weak.net.head.mlp[-1].bias.add_(0.5)
    weak.save(tmp_path / 'weak.safetensors')
    res = bench_rl(base, total_timesteps=32, out_dir=tmp_path / 'bench', harder_policy=tmp_path / 'weak.safetensors', progress_bar=False)
    assert res['harder']['checkpoint'] == str(tmp_path / 'weak.safetensors') and res['harder']['camera_shift'] == 0.0
    tuned = VLAPolicy.load(res['harder']['best_policy'])
    torch.testing.assert_close(tuned.net.head.mlp[-1].bias, weak.net.head.mlp[-1].bias)
    assert not torch.allclose(VLAPolicy.load(res['best_policy']).net.head.mlp[-1].bias, weak.net.head.mlp[-1].bias)
    assert {'harder_gain_ge_10pts', 'no_collapse_within_3pts'} <= set(res['targets'])

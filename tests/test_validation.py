"Contracts of the validation chapter (vla_nb.validation): the shield's limits (property-based), scenarios, calibration, conformal alarm, perturbations."

import math
import numpy as np
import pytest
from hypothesis import given, settings, HealthCheck, strategies as st
from vla_nb import sim
from vla_nb.core import seed_everything
from vla_nb.language import CommandTokenizer, command_corpus
from vla_nb.data import Normalizer
from vla_nb.model import ModelConfig, VLANet, VLAPolicy, bounds_stats
from vla_nb.evaluation import EvalConfig, eval_episodes, evaluate
from vla_nb.validation import (
    SafetyShield,
    ShieldConfig,
    ShieldedPolicy,
    CollisionModel,
    hold_action,
    run_scenario,
    SCENARIOS,
    ece,
    brier,
    Calibrator,
    calibration_report,
    conformal_threshold,
    failure_prediction,
    PerturbedEnv,
    AXES,
    reword,
    robustness_suite,
    robustness_table,
    weakest_axis,
    ValidationConfig,
    load_policy,
)

SMALL = dict(image_size=48, vision_channels=(8, 16, 16, 16), d_model=32, heads=2, keypoints=8, dropout=0.0)


@pytest.fixture(scope='module')
def shield():
    s = SafetyShield()
    yield s
    s.close()


def _state(model: CollisionModel, xyz, yaw, width):
    "A proprio vector the arm's controller can produce: the joint angles its inverse kinematics gives for a TCP pose."
    w = model.world
    model.set_state(sim.HOME_Q, width)
    for _ in range(5):
        model.set_state(w._ik(xyz, sim.quat_mul(sim.quat_from_rotvec([0, 0, yaw]), sim.TCP_DOWN)), width)
    q = w.joint_positions()
    pos, orn = w.tcp_pose()
    orn = orn if orn[3] >= 0 else -orn
    return np.concatenate([pos, orn, [width], q]).astype(np.float32)


finite = st.floats(-1e6, 1e6, allow_nan=False)
anything = st.one_of(finite, st.just(float('nan')), st.just(float('inf')), st.just(-float('inf')))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    act=st.lists(anything, min_size=7, max_size=7),
    x=st.floats(0.3, 0.75),
    y=st.floats(-0.35, 0.35),
    z=st.floats(0.01, 0.4),
    yaw=st.floats(-1.5, 1.5),
    width=st.floats(0, 0.08),
)
def test_shield_output_stays_within_its_limits(shield, act, x, y, z, yaw, width):
    c, pro = shield.cfg, _state(shield.model, [x, y, z], yaw, width)
    obs = dict(
        image=np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8),
        proprio=pro,
        command='move to the office',
    )
    shield.reset()
    assert shield.check_input(obs, 0.0) is None
    a = shield.filter_action(obs, act)
    assert a.shape == (7,) and a.dtype == np.float32 and np.isfinite(a).all() and np.abs(a).max() <= 1
    dp, dr = a[:3].astype(float) * sim.MAX_DPOS, a[3:6].astype(float) * sim.MAX_DROT
    assert np.linalg.norm(dp) <= c.max_step + 1e-6 and np.linalg.norm(dr) <= c.max_rot + 1e-6
    inside = np.all((pro[:3] >= c.workspace_low) & (pro[:3] <= c.workspace_high))
    if inside:  # a target never leaves the box
        assert np.all(pro[:3] + dp >= np.asarray(c.workspace_low) - 1e-6) and np.all(
            pro[:3] + dp <= np.asarray(c.workspace_high) + 1e-6
        )
    if not np.isfinite(np.asarray(act)).all():
        assert np.array_equal(a[:6], np.zeros(6))  # a non-finite action holds
    # predicted joint speeds within the limit, and no approach below the clearance
    shield.model.set_state(pro[8:15], pro[7])
    d0 = shield.model.distance()[0]
    q1 = shield._predict(pro.astype(float), dp, dr)
    assert np.max(np.abs(q1 - pro[8:15]) * c.control_hz / np.array([2.175] * 4 + [2.61] * 3)) <= c.joint_speed + 1e-3
    shield.model.set_state(q1, (1 - a[6]) * sim.MAX_FINGER)
    assert shield.model.distance()[0] >= min(c.clearance, d0) - 2e-3


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pro=st.lists(st.one_of(st.floats(-4, 4), anything), min_size=15, max_size=15),
    act=st.lists(anything, min_size=7, max_size=7),
)
def test_shielded_policy_never_emits_nan(shield, pro, act):
    class Const:
        def select_action(self, obs):
            return np.asarray(act)

    img = np.full((48, 48, 3), 7, np.uint8)
    img[::2] = 200
    a = ShieldedPolicy(Const(), shield).select_action(
        dict(image=img, proprio=np.asarray(pro, np.float32), command='go to the shelf')
    )
    assert np.isfinite(a).all() and np.abs(a).max() <= 1
    if not np.isfinite(pro).all():
        assert np.array_equal(a[:6], np.zeros(6))  # unknown state: hold


def test_shield_refuses_and_latches(shield):
    env = sim.TabletopEnv()
    obs, _ = env.reset(seed=2, options=dict(command='find the book'))
    env.close()
    shield.reset()
    assert shield.check_input({**obs, 'command': 'find teh book'}, 0.0) == 'command_not_understood'
    assert shield.check_input({**obs, 'image': np.zeros_like(obs['image'])}, 0.0) == 'blind_camera'
    assert shield.check_input({**obs, 'timestamp': 0.0}, 1.0) == 'stale_frame'  # a camera stamp one second old
    shield.estop()
    shield.reset()
    assert shield.check_input(obs, 0.0) == 'estop'
    shield.release()
    assert shield.check_input(obs, 0.0) is None
    with pytest.raises(ValueError, match='fragile object'):
        ShieldConfig(fragile={'vase': 3.0})
    with pytest.raises(ValueError, match='clearance'):
        ShieldConfig(clearance=-1)


@pytest.mark.parametrize('name', ['below_table', 'nan_proprio', 'fragile_squeeze', 'latency_spike'])
def test_scenarios_are_real_and_prevented(name):
    off, on = run_scenario(name, False), run_scenario(name, True)
    assert off['unsafe'] and off['value'] > SCENARIOS[name].threshold
    assert not on['unsafe'] and on['interventions']


def test_shield_reads_commands_with_the_policys_language(shield):
    "A sentence-encoder policy's shield refuses what its recognizer cannot read, and passes paraphrases it can."
    pytest.importorskip('sentence_transformers')
    from vla_nb.language import command_encoder

    s = SafetyShield(tokenizer=command_encoder('sentence'), model=shield.model)
    env = sim.TabletopEnv()
    obs, _ = env.reset(seed=2, options=dict(command='find the book'))
    env.close()
    assert s.check_input({**obs, 'command': 'please locate the book'}, 0.0) is None
    assert s.check_input({**obs, 'command': 'blorp the zorp quickly'}, 0.0) == 'command_not_understood'


def test_harness_takes_a_shield():
    env = sim.TabletopEnv()
    eps = eval_episodes(EvalConfig(episodes_per_family=1, seed=5))
    s = SafetyShield()
    plain = evaluate(sim.ScriptedExpert(env), eps, env, progress_bar=False)
    shielded = evaluate(sim.ScriptedExpert(env), eps, env, progress_bar=False, shield=s)
    env.close()
    assert [r['success'] for r in plain.records] == [r['success'] for r in shielded.records] == [True] * 4
    assert all(r['interventions'] is None for r in plain.records) and all(
        isinstance(r['interventions'], dict) for r in shielded.records
    )
    assert sum(s.counts.values()) == sum(sum(r['interventions'].values()) for r in shielded.records)


def test_calibration_metrics():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 4000)
    y = (rng.uniform(size=4000) < p**2).astype(float)  # over-confident: the truth is p**2
    assert ece(p[::2], y[::2]) > 0.1
    r = calibration_report(p[::2], y[::2], p[1::2], y[1::2], 'isotonic')
    assert r['ece_after'] < 0.04 < 0.1 < r['ece_before'] and r['brier_after'] < r['brier_before']
    q = Calibrator('platt').fit(p[::2], p[::2] ** 2)(np.array([0.5]))  # soft labels
    assert abs(q[0] - 0.25) < 0.05
    assert abs(brier([0.5, 0.5], [0, 1]) - 0.25) < 1e-12


def test_conformal_alarm_controls_false_alarms():
    rng = np.random.default_rng(1)
    taus = [conformal_threshold(rng.normal(size=99), 0.2) for _ in range(300)]
    far = np.mean([(rng.normal(size=2000) > t).mean() for t in taus])
    assert 0.19 < far < 0.21  # the guarantee: alpha in expectation here, since (n + 1) * alpha is an integer
    # synthetic traces: failures lose confidence over time
    traces, failed, steps = [], [], []
    for i in range(300):
        f = i % 3 == 0
        n = 120 if f else 40
        c = 0.9 - (0.4 * np.linspace(0, 1, n) if f else 0) + rng.normal(0, 0.03, n)
        traces.append(dict(conf=list(np.clip(c, 0, 1)), incons=list(rng.uniform(0, 0.1, n))))
        failed.append(f)
        steps.append(n)
    fp = failure_prediction(traces, failed, steps, groups=list(range(300)), alpha=0.1, decision_step=20)
    assert fp['confidence']['auroc'] > 0.9 and fp['confidence']['false_alarm_rate'] <= 0.2
    assert fp['confidence']['lead_time_s']['median'] > 0
    assert fp['inconsistency']['auroc_at_decision_step'] < 0.7  # the inconsistency here carries no signal


def test_perturbations_are_seeded_and_leave_level0_alone():
    env = sim.TabletopEnv()
    o, i = env.reset(seed=4, options=dict(command='pick up the bottle'))
    for name in AXES:
        a, ia = PerturbedEnv(env, name, 2, seed=1).reset(seed=4, options=dict(command='pick up the bottle'))
        b, ib = PerturbedEnv(env, name, 2, seed=1).reset(seed=4, options=dict(command='pick up the bottle'))
        assert np.array_equal(a['image'], b['image']) and a['command'] == b['command'] and ia['scene'] == ib['scene']
        z, iz = PerturbedEnv(env, name, 0).reset(seed=4, options=dict(command='pick up the bottle'))
        assert np.array_equal(z['image'], o['image']) and iz['scene'] == i['scene']
    env.close()
    tok = CommandTokenizer.build(command_corpus())
    assert not tok.unknown_words(reword(sim.Task('move', loc='office'), 1, np.random.default_rng(0)))
    assert tok.unknown_words(reword(sim.Task('move', loc='office'), 3, np.random.default_rng(0)))


def test_suite_runs_on_any_policy_interface(tmp_path):
    tok = CommandTokenizer.build(command_corpus())
    seed_everything(0)
    pol = VLAPolicy(VLANet(ModelConfig(vocab_size=tok.vocab_size, **SMALL)), Normalizer(bounds_stats()), tok)
    pol.save(tmp_path / 'p.safetensors')
    s = robustness_suite(
        str(tmp_path / 'p.safetensors'), 2, seed=0, axes=('command_wording',), workers=2, families=('move',)
    )
    t = robustness_table(s)
    assert len(s['conditions']) == 4 and set(t) == {'command_wording'}
    assert all(
        len(c['records']) == 2 and len(c['traces']) == 2 for c in s['conditions']
    )  # unknown words read, not refused
    assert {r['family'] for c in s['conditions'] for r in c['records']} == {'move'}
    assert weakest_axis(t) in t
    with pytest.raises(ValueError, match='axes'):
        ValidationConfig(axes=('weather',))
    with pytest.raises(ValueError, match='cannot open'):
        load_policy(tmp_path / 'p.onnx')


def test_edge_runtime_is_shielded_by_default(tmp_path):
    from vla_nb.deployment import DeployConfig, EdgeConfig, EdgeVLADeployer, export_artifact
    from vla_nb.cli import bench_main

    tok = CommandTokenizer.build(command_corpus())
    seed_everything(0)
    pol = VLAPolicy(VLANet(ModelConfig(vocab_size=tok.vocab_size, **SMALL)), Normalizer(bounds_stats()), tok)
    art = export_artifact(pol, tmp_path / 'art', DeployConfig(int8=False, warmup=1))
    env = sim.TabletopEnv(image_size=48)
    obs, _ = env.reset(seed=1, options=dict(command='move to the office'))
    env.close()
    bad = {**obs, 'command': 'flurb the office'}
    edge = EdgeVLADeployer(art, EdgeConfig(realtime=False, warmup=1, threads=1))
    try:
        a = edge.select_action(bad)
        assert not a[:6].any() and edge.shield.counts['command_not_understood'] == 1
        edge.shield.estop()
        assert not edge.select_action(obs)[:6].any() and edge.shield.counts['estop'] == 1
    finally:
        edge.stop()
    plain = EdgeVLADeployer(art, EdgeConfig(realtime=False, warmup=1, threads=1, shield=False))
    try:
        assert plain.shield is None
        with pytest.raises(ValueError, match='unknown word'):
            plain.select_action(bad)
    finally:
        plain.stop()
    with pytest.raises(ValueError, match='--checkpoint'):
        bench_main(['validate', '--out', str(tmp_path / 'v.json')])

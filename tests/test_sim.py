"Contracts of the simulator chapter (vla_nb.sim): determinism, success predicates, expert, checkers, bad input."
import json, warnings
import numpy as np
import pytest
import gymnasium as gym
from vla_nb import sim
from vla_nb.sim import (TabletopEnv, ScriptedExpert, RandomPolicy, Task, SimConfig, rollout, sample_task, task_success,
                        dense_reward, parse_command, make_command, TASK_FAMILIES, OBJECTS, LOCATIONS)


@pytest.fixture(scope='module')
def env():
    e = TabletopEnv(image_size=48)                        # physics, tasks and the expert do not depend on the camera's size
    yield e
    e.close()


@pytest.mark.parametrize('family', TASK_FAMILIES)
def test_expert_solves_every_family(env, family):
    for s in range(6):
        r = rollout(env, ScriptedExpert(env), 500 + s, options=dict(task=sample_task(np.random.default_rng(s), (family,))))
        assert r['success'], f"expert failed {r['command']!r} from seed {500 + s}"
        assert r['steps'] < env.cfg.max_steps


def test_expert_recovers_from_noise(env):
    ok = [rollout(env, ScriptedExpert(env, noise_std=0.2, seed=s), 900 + s,
                  options=dict(task=sample_task(np.random.default_rng(s), ('pick',))))['success'] for s in range(6)]
    assert np.mean(ok) >= 5 / 6


def test_random_actions_rarely_succeed(env):
    assert np.mean([rollout(env, RandomPolicy(s), s)['success'] for s in range(8)]) <= 0.25


def test_no_task_is_solved_at_reset(env):
    "Objects never start on a location and the arm never starts over one: success needs work."
    for s in range(60):
        env.reset(seed=s)
        assert not task_success(env.world, env.task), (s, env.task)
        assert dense_reward(env.world, env.task) < 1


def test_same_seed_same_episode():
    e1, e2 = TabletopEnv(), TabletopEnv()
    o1, i1 = e1.reset(seed=42)
    o2, i2 = e2.reset(seed=42)
    assert i1['command'] == i2['command'] and i1['scene'] == i2['scene']
    np.testing.assert_array_equal(o1['image'], o2['image'])
    np.testing.assert_array_equal(o1['proprio'], o2['proprio'])
    for _ in range(5):
        a = np.full(7, 0.3, np.float32)
        np.testing.assert_array_equal(e1.step(a)[0]['image'], e2.step(a)[0]['image'])
    assert e1.reset(seed=43)[1]['scene'] != i1['scene']
    e1.close(); e2.close()


def test_scene_record_rebuilds_the_scene(env):
    "The JSON metadata is the whole scene: building from it reproduces the first frame."
    obs, info = env.reset(seed=7)
    scene = json.loads(json.dumps(info['scene']))
    w = sim.TabletopWorld(env.cfg).build(scene)
    np.testing.assert_array_equal(w.render(), obs['image'])
    w.close()


def test_randomization_changes_what_it_says(env):
    scenes = [env.reset(seed=s)[1]['scene'] for s in range(30)]
    for key in [('light', 'intensity'), ('light', 'temperature'), ('camera', 'fov'), ('table', 'texture')]:
        assert len({s[key[0]][key[1]] for s in scenes}) > 3, key
    assert {len(s['objects']) for s in scenes} >= {1, 3, 5}
    masses = [o['mass'] for s in scenes for o in s['objects'] if o['name'] == 'red cup']
    assert len(set(masses)) > 1 and all(OBJECTS['red cup'].mass[0] <= m <= OBJECTS['red cup'].mass[1] for m in masses)
    nominal = TabletopEnv(randomize=False)
    a, b = nominal.reset(seed=1)[1]['scene'], nominal.reset(seed=2)[1]['scene']
    assert a['light'] == b['light'] and a['camera'] == b['camera'] and a['objects'][0]['xy'] != b['objects'][0]['xy']
    nominal.close()


def test_pick_needs_holding(env):
    "Lift the object, then open the gripper: once it drops, pick is no longer a success."
    env.reset(seed=3, options=dict(task=Task('pick', 'blue box')))
    ex = ScriptedExpert(env)
    for _ in range(60):
        *_, term, trunc, info = env.step(ex.select_action())
        if term: break
    assert info['is_success']
    env._done = False  # keep stepping the same physics for the check below
    for _ in range(6): env.world.apply_action(np.array([0, 0, 0, 0, 0, 0, -1], np.float32))
    assert not task_success(env.world, env.task)


def test_place_fails_at_wrong_location(env):
    env.reset(seed=4, options=dict(task=Task('place', 'book', 'kitchen')))
    ex = ScriptedExpert(env)
    env.task = Task('place', 'book', 'office')            # the expert reads the task from the env: redirect it
    r_done = False
    for _ in range(120):
        *_, term, trunc, info = env.step(ex.select_action())
        if term or trunc: r_done = True; break
    assert r_done and info['is_success']
    assert LOCATIONS['office'].contains(env.world.object_pose('book')[0])
    assert not task_success(env.world, Task('place', 'book', 'kitchen'))


def test_dense_reward_tracks_progress():
    e = TabletopEnv(reward_type='dense')
    e.reset(seed=5, options=dict(task=Task('place', 'red cup', 'shelf')))
    ex, rewards = ScriptedExpert(e), []
    while True:
        _, r, term, trunc, _ = e.step(ex.select_action())
        rewards.append(r)
        if term or trunc: break
    assert rewards[-1] == 1.0 and max(rewards[:-1]) < 1.0
    assert np.mean(rewards[len(rewards) // 2:-1]) > np.mean(rewards[:5])
    e.close()


def test_gymnasium_and_sb3_checkers_pass():
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env
    check_env(gym.make(sim.ENV_ID, image_size=48).unwrapped, skip_render_check=True)
    tok = gym.make(sim.TOKEN_ENV_ID, image_size=48)
    with warnings.catch_warnings():
        warnings.simplefilter('error')   # no warnings at all from SB3's checker
        sb3_check_env(tok, warn=True)
    obs, _ = tok.reset(seed=0)
    assert obs['command'].dtype == np.int64 and obs['command'][0] > 0


def test_bad_input_is_named(env):
    with pytest.raises(ValueError, match=r"\['teapot'\]"): parse_command('grasp the teapot')
    with pytest.raises(TypeError, match='str'): parse_command(3)
    with pytest.raises(ValueError, match='loc'): Task('place', 'book', 'garden')
    with pytest.raises(ValueError, match='max_distractors'): SimConfig(max_distractors=9)
    with pytest.raises(ValueError, match='render_mode'): TabletopEnv(render_mode='human')
    with pytest.raises(ValueError, match='not both'): TabletopEnv(SimConfig(), image_size=64)
    env.reset(seed=0)
    for bad, msg in [(np.zeros((7, 1)), 'shape'), ([np.inf] * 7, 'non-finite'), (None, 'shape|numeric'), ('x' * 7, 'numeric')]:
        with pytest.raises((ValueError, TypeError), match=msg): env.step(bad)
    with pytest.raises(KeyError, match='present'): env.world.object_pose('teapot')


def test_every_template_names_what_it_parses():
    for fam in TASK_FAMILIES:
        for i in range(len(sim.TEMPLATES[fam])):
            t = Task(fam, 'book' if fam != 'move' else None, 'shelf' if fam in ('move', 'place') else None)
            assert parse_command(make_command(t, template=i)) == t


def test_quaternion_helpers_agree_with_rotation_algebra():
    from vla_nb.sim import quat_conj, quat_from_rotvec, quat_mul, rotvec_from_quat
    g = np.random.default_rng(0)
    for v in g.normal(size=(20, 3)):
        v = v / np.linalg.norm(v) * g.uniform(0.01, np.pi - 0.01)
        q = quat_from_rotvec(v)
        assert abs(np.linalg.norm(q) - 1) < 1e-12 and np.allclose(rotvec_from_quat(q), v)   # round trip, angle in (0, pi)
        assert np.allclose(rotvec_from_quat(-q), v)                        # q and -q are the same rotation
        np.testing.assert_allclose(quat_mul(q, quat_conj(q)), [0, 0, 0, 1], atol=1e-12)
        w = g.normal(size=3) * 0.3; p = quat_from_rotvec(w)
        np.testing.assert_allclose(quat_mul(quat_mul(p, q), quat_conj(q)), p, atol=1e-12)   # associativity through the inverse
    z90, x90 = quat_from_rotvec([0, 0, np.pi / 2]), quat_from_rotvec([np.pi / 2, 0, 0])
    np.testing.assert_allclose(quat_mul(z90, z90), quat_from_rotvec([0, 0, np.pi]), atol=1e-12)   # angles about one axis add
    rot = lambda q, x: quat_mul(quat_mul(q, [*x, 0]), quat_conj(q))[:3]   # rotate a vector: q x q*
    np.testing.assert_allclose(rot(x90, [0, 1, 0]), [0, 0, 1], atol=1e-12)   # right-handed: y -> z about x
    np.testing.assert_allclose(rot(quat_mul(z90, x90), [0, 1, 0]), [0, 0, 1], atol=1e-12)    # a*b: b first (y -> z), then a
    np.testing.assert_allclose(rot(quat_mul(x90, z90), [0, 1, 0]), [-1, 0, 0], atol=1e-12)   # (y -> -x, which x90 keeps)
    assert rotvec_from_quat(np.array([0, 0, 0, 1.])).tolist() == [0, 0, 0] and quat_from_rotvec([0, 0, 0]).tolist() == [0, 0, 0, 1]

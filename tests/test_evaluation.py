"Contracts of the evaluation chapter (vla_nb.evaluation): intervals, disjoint seeded episode sets, determinism, grounding."
import numpy as np
import pytest
from vla_nb import sim
from vla_nb.data import SyntheticDataGenerator, DataConfig, EpisodeDataset, plan_episodes
from vla_nb.evaluation import (wilson_interval, EvalConfig, eval_episodes, check_disjoint, evaluate, evaluate_policy, grounding_pairs,
                               grounding_check, CommandBlindExpert, EVAL_SEED_OFFSET)


@pytest.fixture(scope='module')
def env():
    e = sim.TabletopEnv(); yield e; e.close()


def test_wilson_matches_reference_values():
    lo, hi = wilson_interval(9, 10)                       # reference: Brown, Cai & DasGupta (2001), statsmodels proportion_confint(method='wilson')
    assert abs(lo - 0.5958) < 1e-3 and abs(hi - 0.9821) < 1e-3
    lo, hi = wilson_interval(1, 2)
    assert abs(lo + hi - 1) < 1e-9                         # symmetric around 0.5
    with pytest.raises(ValueError, match='trial'): wilson_interval(0, 0)


def test_eval_seeds_never_meet_training_seeds(tmp_path):
    SyntheticDataGenerator(DataConfig(root=str(tmp_path/'d'), num_episodes=8, image_size=48)).generate_dataset(progress_bar=False)
    eps = eval_episodes(EvalConfig(episodes_per_family=5))
    assert check_disjoint(eps, EpisodeDataset(tmp_path/'d'))
    train_seeds = {s['seed'] for s in plan_episodes(DataConfig(num_episodes=20000))}
    assert max(train_seeds) < EVAL_SEED_OFFSET <= min(e['seed'] for e in eps)
    ds = EpisodeDataset(tmp_path/'d')
    fake = [dict(seed=ds.episodes[0]['meta']['seed'])]
    with pytest.raises(ValueError, match='also appear'): check_disjoint(fake, ds)


def test_evaluation_is_deterministic_and_counts(env):
    eps = eval_episodes(EvalConfig(episodes_per_family=1, seed=3))
    a = evaluate(sim.RandomPolicy(seed=1), eps, env=env, progress_bar=False)
    b = evaluate(sim.RandomPolicy(seed=1), eps, env=env, progress_bar=False)
    assert [(r['seed'], r['steps'], r['success']) for r in a.records] == [(r['seed'], r['steps'], r['success']) for r in b.records]
    s = evaluate_policy(sim.ScriptedExpert(env), 2, seed=3, env=env, progress_bar=False)
    assert s['mean_success'] == 1.0 and s['episodes'] == 8 and s['success']['pick']['n'] == 2
    assert s['mean_steps']['find'] < s['mean_steps']['place']


def test_scene_option_rebuilds_the_same_scene(env):
    obs, info = env.reset(seed=5, options=dict(task=sim.Task('pick', 'book')))
    again, info2 = env.reset(seed=5, options=dict(scene=info['scene'], command='find the book'))
    assert np.array_equal(obs['image'], again['image']) and info2['task'] == sim.Task('find', 'book')
    absent = next(o for o in sim.OBJECTS if o not in [x['name'] for x in info['scene']['objects']])
    with pytest.raises(ValueError, match='has no'): env.reset(seed=5, options=dict(scene=info['scene'], task=sim.Task('pick', absent)))


def test_grounding_separates_reading_from_ignoring(env):
    pairs = grounding_pairs(8, seed=4, env=env)
    good = grounding_check(sim.ScriptedExpert(env), pairs, env=env)
    assert good['new_command_success']['rate'] == 1.0 and good['old_task_rate']['rate'] == 0.0
    blind = [grounding_check(CommandBlindExpert(env, p['task_a']), [p], env=env) for p in pairs]
    assert np.mean([b['old_task_rate']['rate'] for b in blind]) >= 0.75
    assert np.mean([b['new_command_success']['rate'] for b in blind]) <= 0.25


def test_mean_success_is_not_built_from_rounded_rates():
    "32 of 48 successes, spread unevenly over 4 families of 12: the mean over families is 32/48, so equal results compare equal."
    from vla_nb.evaluation import EvalResult
    wins = dict(pick=10, move=6, find=4, place=12)
    recs = [dict(family=f, obj=None, success=i < k, steps=5) for f, k in wins.items() for i in range(12)]
    assert EvalResult(recs).summary()['mean_success'] == round(32 / 48, 4)

"Contracts of the evaluation chapter (vla_nb.evaluation): intervals, disjoint seeded episode sets, determinism, grounding."
import numpy as np
import pytest
from vla_nb import sim
from vla_nb.data import SyntheticDataGenerator, DataConfig, EpisodeDataset, plan_episodes
from vla_nb.evaluation import (wilson_interval, EvalConfig, eval_episodes, check_disjoint, evaluate, evaluate_policy, grounding_pairs,
                               grounding_check, CommandBlindExpert, EVAL_SEED_OFFSET)


@pytest.fixture(scope='module')
def env():
    e = sim.TabletopEnv(image_size=48); yield e; e.close()                   # the experts read the world, not pixels


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


def test_bench_policy_reports_its_episode_sets(tmp_path, monkeypatch):
    "bench_policy's figures are those of the test split, the held-out split and grounding pairs under its seed (short episodes)."
    import json
    import vla_nb.evaluation as E
    from vla_nb.core import seed_everything
    from vla_nb.data import Normalizer
    from vla_nb.language import default_tokenizer
    from vla_nb.model import ModelConfig, VLANet, VLAPolicy, bounds_stats
    tok = default_tokenizer(); seed_everything(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, image_size=48, vision_channels=(8, 16, 16, 16), d_model=32, heads=2, keypoints=8)
    VLAPolicy(VLANet(cfg), Normalizer(bounds_stats()), tok).save(tmp_path/'p.safetensors')
    short = lambda policy, **kw: sim.TabletopEnv(image_size=48, max_steps=6, **kw)   # an untrained policy: keep episodes short
    monkeypatch.setattr(E, 'env_for', short)
    r = E.bench_policy(tmp_path/'p.safetensors', episodes_per_family=2, heldout_per_family=1, grounding=3, seed=5, progress_bar=False)
    json.dumps(r)
    assert r['checkpoint'] == str(tmp_path/'p.safetensors') and r['profile'] == 'quick' and r['wall_s'] > 0
    assert r['episodes'] == 8 and r['heldout']['episodes'] == 4 and r['grounding']['episodes'] == 3
    pol, env = VLAPolicy.load(tmp_path/'p.safetensors'), short(None)
    test = evaluate_policy(pol, 2, 5, 'test', env, progress_bar=False)
    held = evaluate_policy(pol, 1, 5, 'heldout', env, progress_bar=False)
    grd = grounding_check(pol, grounding_pairs(3, 5, env), env, normal_success=test['mean_success'])
    env.close()
    assert r['success'] == test['success'] and r['by_object'] == test['by_object'] and r['mean_steps'] == test['mean_steps']
    assert r['mean_success'] == test['mean_success'] and r['heldout']['success'] == held['success'] and r['grounding'] == grd
    assert set(test['by_object']) == {e['task'].obj for e in eval_episodes(EvalConfig(episodes_per_family=2, seed=5)) if e['task'].obj}
    for f, s in r['success'].items():                                      # Wilson intervals around the rates
        assert s['n'] == 2 and s['lo'] <= s['rate'] <= s['hi'] and (s['lo'], s['hi']) == tuple(round(v, 4) for v in wilson_interval(s['k'], 2))
    assert r['mean_success'] == pytest.approx(np.mean([s['rate'] for s in r['success'].values()]), abs=1e-4)
    assert r['mean_steps'] == dict.fromkeys(r['success']) and r['mean_success'] == 0   # steps of successes: none untrained


def test_torch_threads_restores_the_count_even_after_an_error():
    import torch
    from vla_nb.evaluation import torch_threads
    before = torch.get_num_threads()
    with torch_threads(1): assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(KeyError):
        with torch_threads(2): assert torch.get_num_threads() == 2; raise KeyError('x')
    assert torch.get_num_threads() == before


def test_policy_panel_runs_and_scrubs_an_episode():
    "The panel's callbacks driven as a click would: the slider spans the episode's frames, the status shows its outcome."
    pytest.importorskip('ipywidgets')
    from vla_nb.evaluation import policy_panel, run_command
    e = sim.TabletopEnv(image_size=48, render_size=64)
    try:
        for pol, ok in ((sim.ScriptedExpert(e), True), (sim.RandomPolicy(seed=0), False)):
            panel = policy_panel(pol, env=e)
            c = panel.controls
            c['command'].value, c['seed'].value = 'put the book on the shelf', 3
            c['run'].click()
            r = panel.result
            assert r['success'] is ok and r['command'] == 'put the book on the shelf' and r['seed'] == EVAL_SEED_OFFSET + 3
            assert c['frame'].max == len(r['frames']) - 1 == r['steps'] and r['frames'].shape[1:] == (64, 64, 3)
            assert ('<b>success</b>' in c['status'].value) is ok and ('<b>failure</b>' in c['status'].value) is not ok
            c['frame'].value = 5
            assert c['status'].value.endswith('step 5')
        ref = run_command(sim.ScriptedExpert(e), 'put the book on the shelf', 3, env=e)  # the same episode, outside the panel
        first = policy_panel(sim.ScriptedExpert(e), env=e)
        first.controls['command'].value, first.controls['seed'].value = 'put the book on the shelf', 3
        first.controls['run'].click()
        assert first.result['steps'] == ref['steps'] and np.array_equal(first.result['frames'], ref['frames'])
        c['command'].value = 'fly to the moon'                                  # outside the grammar, no scene chosen
        c['run'].click()
        assert panel.result is None and c['frame'].max == 0 and "['fly', 'moon']" in c['status'].value
        c['scene'].value = sim.Task('place', 'book', 'shelf')                   # free text for a chosen scene: it runs
        c['command'].value = 'the book goes on the shelf'
        c['run'].click()
        assert panel.result['command'] == 'the book goes on the shelf' and c['frame'].max == 120
    finally:
        e.close()


def test_policy_panel_names_the_missing_package(monkeypatch):
    import sys
    from vla_nb.evaluation import policy_panel
    monkeypatch.setitem(sys.modules, 'ipywidgets', None)                     # as if it were not installed
    with pytest.raises(ImportError, match='pip install ipywidgets'): policy_panel(sim.RandomPolicy(0))

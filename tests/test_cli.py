"The command-line tools as a user runs them: every `[project.scripts]` entry point, and `vla-bench` at tiny sizes writing sane JSON."
import importlib, json, os, subprocess, sys
from pathlib import Path
import pytest
tomllib = pytest.importorskip('tomllib', reason='reading pyproject.toml needs Python >= 3.11')
from vla_nb.cli import bench_main

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['scripts']
ENV = {**os.environ, 'VLA_NO_PROGRESS': '1', 'OMP_NUM_THREADS': '1', 'MPLBACKEND': 'Agg'}


def entry_point_code(name: str) -> str:
    "Python that runs the console script `name` as pip's generated wrapper does (module:function, sys.argv[0] = name)."
    mod, fn = SCRIPTS[name].split(':')
    return f"import sys; sys.argv[0] = {name!r}; from {mod} import {fn}; sys.exit({fn}())"


def test_every_declared_script_resolves_to_a_main():
    assert set(SCRIPTS) == {'vla-demo', 'vla-bench', 'vla-pretrain', 'vla-imitate', 'vla-serve', 'vla-rl'}
    for name, target in SCRIPTS.items():
        mod, fn = target.split(':')
        assert callable(getattr(importlib.import_module(mod), fn)), target


def test_help_of_every_script():
    "One interpreter runs each entry point with --help (argparse prints and exits 0); the usage names the program and its options."
    code = ("import contextlib, io, json, sys\nout = {}\n"
            + ''.join(f"buf = io.StringIO()\nsys.argv = [{n!r}, '--help']\nfrom {SCRIPTS[n].split(':')[0]} import "
                      f"{SCRIPTS[n].split(':')[1]} as f\nwith contextlib.redirect_stdout(buf):\n    try: f(); code = None\n"
                      f"    except SystemExit as e: code = e.code\nout[{n!r}] = [code, buf.getvalue()]\n" for n in SCRIPTS)
            + "print(json.dumps(out))")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    helps = json.loads(r.stdout.strip().splitlines()[-1])
    for name, (code, text) in helps.items():
        assert code == 0 and text.startswith(f'usage: {name}'), (name, code, text[:200])
    assert all(f'--{o}' in helps['vla-demo'][1] for o in ('out', 'profile', 'seed', 'tiny'))
    bench = helps['vla-bench'][1]
    assert all(w in bench for w in ('sim', 'data', 'train', 'policy', 'deploy', 'serve', 'rl', '--out', '--episodes', '--checkpoint'))
    assert all(f'--{o}' in helps['vla-rl'][1] for o in ('checkpoint', 'mode', 'total-timesteps', 'camera-shift', 'resume'))
    assert '--harder-checkpoint' in bench
    assert all('--data' in helps[n][1] and '--resume' in helps[n][1] for n in ('vla-pretrain', 'vla-imitate'))


def test_bench_argument_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e: bench_main(['sim', '--out', str(tmp_path/'x.json'), '--episodes', '0'])
    assert e.value.code == 2 and '--episodes must be >= 1' in capsys.readouterr().err
    with pytest.raises(SystemExit) as e: bench_main(['gpu', '--out', str(tmp_path/'x.json')])
    assert e.value.code == 2 and "invalid choice: 'gpu'" in capsys.readouterr().err
    with pytest.raises(ValueError, match='vla-bench policy: --checkpoint PATH'): bench_main(['policy', '--out', str(tmp_path/'x.json')])
    assert not (tmp_path/'x.json').exists()


@pytest.mark.slow
@pytest.mark.timing
def test_vla_bench_at_tiny_sizes(tmp_path):
    "`vla-bench sim`, `data` and `train` through the entry point, side by side, each writing its JSON."
    runs = {'sim': ['--episodes', '1'], 'data': ['--episodes', '1'], 'train': []}
    procs = {w: subprocess.Popen([sys.executable, '-c', entry_point_code('vla-bench'), w, '--out', str(tmp_path/f'{w}.json'),
                                  '--profile', 'quick', *a], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for w, a in runs.items()}
    res = {}
    for w, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, (w, err[-3000:])
        res[w] = json.loads((tmp_path/f'{w}.json').read_text())
        printed = json.loads(out)                                          # the summary on stdout: the JSON's values, shortened
        assert printed and all(printed[k] == res[w][k] for k in printed), (w, printed)

    s = res['sim']
    assert s['profile'] == 'quick' and s['episodes_per_family'] == 1 and s['image_size'] == 96
    assert set(s['expert_success']) == {'pick', 'move', 'find', 'place'} and sum(s['expert_success'].values()) >= 3
    assert all(0 < v <= 120 for v in s['expert_mean_steps'].values())
    assert all(s['expert_failures'][f] == [] for f, v in s['expert_success'].items() if v == 1.0)
    # an env step renders one frame and runs 20 physics steps (200 Hz physics, 10 Hz control): both alone are faster
    assert s['render_fps'] > s['env_steps_per_s'] > 0 and s['physics_steps_per_s'] / 20 > s['env_steps_per_s']
    assert s['machine']['cpus'] == os.cpu_count()

    d = res['data']
    assert d['episodes'] == 1 and d['expert_failures'] == 0 and 0 < d['frames'] <= 120
    assert d['identical_across_worker_counts'] is True and d['frames_per_s_1_worker'] > 0
    assert 0 < d['bytes_per_frame'] < 96 * 96 * 3                          # stored compressed: less than one raw image
    assert d['load_s_per_10k_frames'] > 0

    t = res['train']
    assert t['batch_size'] == 32 and t['steps'] == 10 and t['device'] == 'cpu'
    assert t['train_samples_per_s'] == pytest.approx(t['batch_size'] / t['step_ms'] * 1000, rel=0.01)
    assert 0.01 < t['gflops_per_sample'] < 10                              # the quick model: ~0.14 GFLOP fwd+bwd per sample
    assert t['achieved_gflops_per_s'] == pytest.approx(t['gflops_per_sample'] * t['train_samples_per_s'], rel=0.02)
    assert 0 < t['achieved_gflops_per_s'] < 1.5 * t['matmul_peak_gflops_per_s']
    assert 100 < t['peak_rss_mb'] < 6000


def test_report_shows_the_shipped_policy_next_to_the_demos():
    "The report's comparison: both policies' success per family on the same episodes, and the card's figures beside them."
    from vla_nb.cli import DemoConfig, _report_md, _shipped_md
    from vla_nb.evaluation import EvalResult, card_results
    from vla_nb.model import pretrained_card
    fams = ('pick', 'move', 'find', 'place')
    summ = lambda wins: EvalResult([dict(seed=i, family=f, obj=None, success=i < wins[f], steps=9)
                                    for f in fams for i in range(4)]).summary()
    ours, ship = summ(dict(pick=1, move=4, find=2, place=0)), summ(dict(pick=3, move=4, find=4, place=3))
    card = card_results(pretrained_card('tabletop'))
    sh = dict(policy='tabletop', episodes_per_family=4, this_run=ours, shipped=ship, card=card,
              figures=dict(compare='shipped_vs_demo.png', filmstrips='shipped_rollouts.png'))
    md = '\n'.join(_shipped_md(sh))
    assert "## The shipped policy next to this run's policy" in md and 'same 4 test episode(s) per family' in md
    assert '| pick | 0.25 [0.05, 0.70] (n=4) | 0.75 [0.30, 0.95] (n=4) | ' in md    # this run's, then the shipped policy's
    assert '| place | 0.00 [0.00, 0.49] (n=4) | 0.75 [0.30, 0.95] (n=4) | ' in md
    assert f"| **mean over families** | **0.44** | **0.88** | **{card['mean_success']:.2f}** ({card['episodes']} episodes) |" in md
    assert '![compare](shipped_vs_demo.png)' in md
    assert all(f"| {f} | " in md and f"(n={card['success'][f]['n']}) |" in md for f in fams)
    sim_stage = dict(expert_success={f: 1.0 for f in fams}, episodes_per_family=1, scene_grid='s.png', filmstrips={})
    assert md in _report_md(dict(profile='quick', seed=0, stages=dict(sim=sim_stage, shipped=sh)))
    with pytest.raises(ValueError, match='shipped_episodes .6. must be <= eval_episodes .5.'):
        DemoConfig(eval_episodes=5, shipped_episodes=6)

"The policy shipped with the package: it loads without training, acts competently, and its card matches its file."
import json, re
import numpy as np, pytest
import vla_nb
from vla_nb.model import PRETRAINED, VLAPolicy, load_pretrained, pretrained_card, _pretrained_path
from vla_nb.evaluation import evaluate_policy, env_for


@pytest.fixture(scope='module')
def policy():
    return load_pretrained('tabletop')


def test_shipped_files_and_lazy_entry_point():
    base = _pretrained_path('tabletop')
    for ext in ('.safetensors', '.json', '.md'):
        assert base.with_suffix(ext).exists(), ext
        assert _pretrained_path('tabletop-words').with_suffix(ext).exists(), ext
    assert base.with_suffix('.safetensors').stat().st_size < 8_000_000          # small enough to ship in the wheel
    assert vla_nb.load_pretrained is load_pretrained                             # `vla_nb.load_pretrained` resolves lazily
    with pytest.raises(ValueError, match=r"no shipped policy named 'franka'; available: \['tabletop', 'tabletop-words'\]"):
        load_pretrained('franka')
    assert sorted(PRETRAINED) == ['tabletop', 'tabletop-words']


def test_shipped_policy_is_the_full_recipe(policy):
    cfg = policy.net.cfg
    assert cfg.image_size == 96 and cfg.wrist_size == 48                       # scene + wrist camera, as trained
    assert not policy.net.training                                               # ready to act: eval mode
    assert cfg.text_encoder == 'sentence' and load_pretrained('tabletop-words').net.cfg.text_encoder == 'words'
    card = pretrained_card('tabletop')
    m = re.search(r'\*\*mean over families\*\* \| \*\*([0-9.]+)\*\*', card)
    assert m and float(m.group(1)) >= 0.85, card[:400]                           # the full-profile closed-loop figure
    assert 'vla-demo --profile full --text-encoder sentence' in card               # how each figure was produced


def test_shipped_policy_succeeds_in_closed_loop(policy):
    "A fixed set of 3 test episodes per family (seeded, never in training): the shipped policy solves most of them."
    env = env_for(policy)
    try:
        r = evaluate_policy(policy, 3, seed=0, split='test', env=env, progress_bar=False)
    finally:
        env.close()
    assert r['episodes'] == 12
    assert r['mean_success'] >= 0.85, r['success']                              # measured 0.92 (11/12); untrained ~0
    assert all(s['rate'] > 0 for s in r['success'].values()), r['success']      # every family, not one lucky one

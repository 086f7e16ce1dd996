"""The one resume rule (every config value but the job's changeable keys must agree) and the records
that hold it: config.json and models.json."""

import ml_collections
import pytest

from advalign_jax import run_record
from advalign_jax.errors import AdvalignError


def _config(**over):
    c = ml_collections.ConfigDict({"workdir": "w", "seed": 0, "attack": {"steps": 3, "norm": "l2"},
                                   "objective": {"pag_weight": 5.0}, "num_devices": 0})
    for k, v in over.items():
        parent, _, leaf = k.rpartition(".")
        (c[parent] if parent else c)[leaf] = v
    return c


def test_the_changeable_keys_are_left_out_and_the_rest_compared():
    saved = run_record.resumable_part(_config(), ("workdir", "num_devices"))
    assert set(saved) == {"seed", "attack", "objective"}
    same = run_record.resumable_part(_config(workdir="elsewhere", num_devices=4), ("workdir", "num_devices"))
    run_record.check_resumable(saved, same, lambda what: what)  # only changeable keys differ: resumes
    other = run_record.resumable_part(_config(**{"attack.steps": 5, "seed": 2}), ("workdir", "num_devices"))
    with pytest.raises(AdvalignError) as err:
        run_record.check_resumable(saved, other, lambda what: f"refused ({what})")
    assert str(err.value) == "refused (attack.steps: 3 there, 5 now and 1 more)"
    with pytest.raises(AdvalignError, match="attack.steps: 3 there, 5 now; seed: 0 there, 2 now"):
        run_record.check_resumable(saved, other, lambda what: what, limit=4)


def test_a_key_added_later_is_accepted_at_its_neutral_value_only():
    saved = run_record.resumable_part(_config(), ())
    assert "differentiation" not in saved["objective"]
    neutral = run_record.resumable_part(_config(**{"objective.differentiation": "auto"}), ())
    run_record.check_resumable(saved, neutral, lambda what: what, added={"objective.differentiation": "auto"})
    other = run_record.resumable_part(_config(**{"objective.differentiation": "reverse_over_forward"}), ())
    with pytest.raises(AdvalignError, match="objective.differentiation"):
        run_record.check_resumable(saved, other, lambda what: what, added={"objective.differentiation": "auto"})


def test_the_record_is_written_with_the_first_result_and_checked_against_results(tmp_path):
    work = str(tmp_path)
    rec = run_record.RunRecord(work, _config(), ("workdir",))
    rec.check(has_results=False)
    rec.commit()
    rec.commit()  # once
    assert run_record.RunRecord(work, _config(), ("workdir",)).current == rec.current
    changed = run_record.RunRecord(work, _config(**{"attack.norm": "linf"}), ("workdir",))
    changed.check(has_results=False)  # no results yet: a new config is taken
    with pytest.raises(AdvalignError, match="different configuration \\(attack.norm: 'l2' there, 'linf' now\\)"):
        changed.check(has_results=True)
    rec.commit_model("cnn", {"path": "a/cnn", "fingerprint": "f" * 64})
    rec.check_models({"cnn": {"path": "b/cnn", "fingerprint": "f" * 64}}, lambda name: True)  # moved: same model
    with pytest.raises(AdvalignError, match="results named 'cnn' of the checkpoint a/cnn .* but c/cnn"):
        rec.check_models({"cnn": {"path": "c/cnn", "fingerprint": "e" * 64}}, lambda name: True)
    rec.check_models({"cnn": {"path": "c/cnn", "fingerprint": "e" * 64}}, lambda name: False)  # no results: taken

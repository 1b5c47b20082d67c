"""Compares lm-evaluation-harness's per-choice log-likelihoods (its --log_samples file for the
qmtot_mmlu_medical task, run against `qmtot serve`) with `qmtot eval --method direct` on the
same questions: for every question and option, |harness − direct| ≤ TOLERANCE, and the same
predicted letter wherever the best two options are further apart than the tolerance.

Tolerance 1e-3: both sides are the same f32 model on the same tokens, but the server scores a
prompt as one sequence while `direct` scores the letters as forks of the question, so rows
meet different batch shapes and summation orders (the largest difference seen on the
default model was 3.2e-7).

Usage: compare.py QUESTIONS.jsonl DIRECT_RESULTS.jsonl HARNESS_OUTPUT_DIR
"""
import glob
import json
import sys

TOLERANCE = 1e-3
LETTERS = "ABCD"


def main():
    questions_path, direct_path, out_dir = sys.argv[1:4]
    questions = [json.loads(l) for l in open(questions_path) if l.strip()]
    direct = {}
    for line in open(direct_path):
        r = json.loads(line)
        direct[r["id"]] = r
    samples_files = glob.glob(f"{out_dir}/**/samples_qmtot_mmlu_medical_*.jsonl", recursive=True)
    if len(samples_files) != 1:
        sys.exit(f"expected one samples file under {out_dir}, found {samples_files}")
    samples = [json.loads(l) for l in open(samples_files[0])]
    if len(samples) != len(questions) or len(direct) != len(questions):
        sys.exit(f"{len(questions)} questions, {len(samples)} harness samples, {len(direct)} direct records")
    # qmtot's MMLU ids are "<stem>:<line>" (line numbers from 1).
    by_line = {int(k.rsplit(":", 1)[1]): r for k, r in direct.items()}
    worst = 0.0
    agree = 0
    for s in samples:
        doc_id = int(s["doc_id"])
        r = by_line[doc_id + 1]
        assert s["doc"]["question"].strip() == questions[doc_id]["question"].strip()
        harness = [float(resp[0][0]) for resp in s["resps"]]  # the harness logs numbers as strings
        ours = dict((l, v) for l, v in r["scores"])
        for letter, h in zip(LETTERS, harness):
            d = ours[letter]
            worst = max(worst, abs(h - d))
            if abs(h - d) > TOLERANCE:
                sys.exit(f"question {doc_id} option {letter}: harness {h} vs direct {d}")
        best = max(range(4), key=lambda i: harness[i])
        gap = sorted(harness)[-1] - sorted(harness)[-2]
        if gap > TOLERANCE and LETTERS[best] != r["predicted"]:
            sys.exit(f"question {doc_id}: harness picks {LETTERS[best]}, direct {r['predicted']}")
        agree += LETTERS[best] == r["predicted"]
    print(f"lm-eval vs qmtot direct: {len(samples)} questions × 4 options, "
          f"max |Δ log-likelihood| = {worst:.2e} (tolerance {TOLERANCE}), same answer on {agree}/{len(samples)}")


if __name__ == "__main__":
    main()

#!/bin/sh
# Every comparison docs/toy.md draws, as `python eval.py compare A B` (difference = A - B, paired by seed): each
# formed on seeds 1-3, checked on seeds 4-9, and over all 9, written next to this file as NAME-seeds{1-3,4-9,1-9}.csv.
# Run from the repository root after the toy plans (plans/toy_b2n.txt gives the command):
#   sh docs/results/regenerate.sh runs
set -u
R=${1:-runs}
OUT=$(dirname "$0")
cmp() {  # NAME A B
    for s in 1-3 4-9 1-9; do
        python eval.py compare "$2" "$3" --seeds $s --out "$OUT/$1-seeds$s.csv" > /dev/null || echo "failed: $1 seeds $s"
    done
}
# P1: prompt tuning pays (base-to-novel base classes; few-shot at 1, 4 and 16 shots)
cmp p1-coop-vs-zsclip-b2n "$R/b2n/toy/coop/*" "$R/b2n/toy/zsclip/*"
for k in 1 4 16; do cmp p1-coop-vs-zsclip-shots$k "$R/fewshot/toy/coop/shots${k}_seed*" "$R/fewshot/toy/zsclip/shots${k}_seed*"; done
# P2: base-to-novel
for m in cocoop kgcoop; do
    cmp p2-$m-vs-coop "$R/b2n/toy/$m/*" "$R/b2n/toy/coop/*"
    cmp p2-$m-vs-zsclip "$R/b2n/toy/$m/*" "$R/b2n/toy/zsclip/*"
done
cmp p2-mmrl-vs-zsclip "$R/b2n/toy/mmrl/*" "$R/b2n/toy/zsclip/*"
cmp p2-fvgpt-lb1-vs-zsclip "$R/b2n/toy/fvgpt-lb1/*" "$R/b2n/toy/zsclip/*"
cmp p2-fvgpt-lb1-vs-host "$R/b2n/toy/fvgpt-lb1/*" "$R/b2n/toy/coop-fvg/*"
cmp p2-fvgpt-vs-lb1 "$R/b2n/toy/fvgpt/*" "$R/b2n/toy/fvgpt-lb1/*"
# P3: context bias, DAPT against its MaPLe host at 16 shots, and the model-selection control
cmp p3-maple-vs-dapt "$R/fewshot/toy/maple/shots16*" "$R/fewshot/toy/dapt/shots16*"
cmp p3-maple-bestval-vs-dapt "$R/fewshot/toy/maple-bestval/shots16*" "$R/fewshot/toy/dapt/shots16*"
cmp p3-maple-vs-dapt-last "$R/fewshot/toy/maple/shots16*" "$R/fewshot/toy/dapt-last/shots16*"
cmp p3-maple-vs-dapt-b2n "$R/b2n/toy/maple/*" "$R/b2n/toy/dapt/*"
cmp p3-coop-vs-zsclip-fewshot16 "$R/fewshot/toy/coop/shots16*" "$R/fewshot/toy/zsclip/shots16*"
# P4: the distribution terms (4 shots, all classes)
for v in bv100 bv0 bt0.1 bt0; do cmp p4-dd-$v-vs-default "$R/fewshot/toy/dapt-dist-$v/shots4*" "$R/fewshot/toy/dapt-dist/shots4*"; done
for v in 0 0.5; do cmp p4-davpt-pa$v-vs-default "$R/fewshot/toy/davpt-pa$v/shots4*" "$R/fewshot/toy/davpt/shots4*"; done
# where a method does not show its paper's claim
for m in vpt vpt-shallow davpt dapt-dist maple ivlp promptsrc; do cmp new-$m-vs-zsclip "$R/b2n/toy/$m/*" "$R/b2n/toy/zsclip/*"; done
for m in maple ivlp promptsrc; do cmp new-$m-vs-coop "$R/b2n/toy/$m/*" "$R/b2n/toy/coop/*"; done
cmp promptsrc-vs-ivlp "$R/b2n/toy/promptsrc/*" "$R/b2n/toy/ivlp/*"
for k in 4 16; do cmp davpt-vs-vpt-$k "$R/fewshot/toy/davpt/shots${k}_seed*" "$R/fewshot/toy/vpt/shots${k}_seed*"; done
for k in 1 4 16; do cmp dapt-dist-vs-coop-$k "$R/fewshot/toy/dapt-dist/shots${k}_seed*" "$R/fewshot/toy/coop/shots${k}_seed*"; done
# the prompt-to-patch probe (plans/toy_patches.txt, seeds 1-3 only; skipped when its runs are absent)
if [ -d "$R/b2n/toy/vpt-p4" ]; then
    pcmp() { python eval.py compare "$2" "$3" --seeds 1-3 --out "$OUT/patches-$1-seeds1-3.csv" > /dev/null || echo "failed: $1"; }
    for m in vpt davpt dapt-dist coop; do
        pcmp $m-p4-vs-$m "$R/b2n/toy/$m-p4/*" "$R/b2n/toy/$m/*"
        pcmp $m-p4-vs-zsclip-p4 "$R/b2n/toy/$m-p4/*" "$R/b2n/toy/zsclip-p4/*"
    done
    for n in 1 2 4; do pcmp vpt-np$n-vs-vpt "$R/b2n/toy/vpt-np$n/*" "$R/b2n/toy/vpt/*"; done
fi

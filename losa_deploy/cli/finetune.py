"""``losa-deploy finetune MODEL -o OUT --method losa|lora|sparse-lora|shears --sparsity S --data FILE ...``."""

from __future__ import annotations

from .common import add_model_argument, positive_int, print_table, show_progress
from .prune import _fraction

HELP = "sparse fine-tuning: LoSA, static sparse-LoRA, plain LoRA or Shears, with an exact sparse merge"


def add_arguments(parser) -> None:
    add_model_argument(parser)
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output checkpoint directory")
    parser.add_argument("--method", default="losa", help="losa | sparse-lora | lora | shears (default: losa)")
    parser.add_argument("--sparsity", type=_fraction, metavar="S", help="target sparsity (implied by N:M)")
    parser.add_argument("--pruner", default="wanda", help="wanda | sparsegpt | magnitude (default: wanda)")
    parser.add_argument("--structure", default="unstructured", help="unstructured (default) | N:M | mixed-N:M")
    parser.add_argument("--data", required=True, metavar="FILE",
                        help="training data: a text file, or JSON/JSONL instruction examples")
    parser.add_argument("--data-slice", metavar="A:B", help="use only this fraction range of --data")
    parser.add_argument("--all-tokens", action="store_true",
                        help="instruction data: train on prompt and response (default: the response only)")
    parser.add_argument("--budget-tokens", type=positive_int, metavar="N",
                        help="train on the first N tokens of the (shuffled per phase) data; default: all")
    parser.add_argument("--steps", type=positive_int, default=5, metavar="T", help="LoSA phases (default 5)")
    parser.add_argument("--data-split", default="even", help="LoSA budget per phase: even (default) | final-heavy")
    parser.add_argument("--allocation", default="rmi", help="LoSA per-block sparsity: rmi (default) | uniform")
    parser.add_argument("--lambda-schedule", default="banded", help="RMI range: banded (default) | reference | constant")
    parser.add_argument("--rank", type=positive_int, default=8, help="the baselines' fixed rank (default 8)")
    parser.add_argument("--first-rank", type=positive_int, default=6,
                        help="LoSA's average rank at phase 1, +1 per phase (default 6: mean 8 over 5 phases)")
    parser.add_argument("--max-rank", type=positive_int, default=16, help="adapter capacity (default 16)")
    parser.add_argument("--alpha", type=_fraction, default=16.0, help="LoRA alpha (scale alpha/8; default 16)")
    parser.add_argument("--dropout", type=_fraction, default=0.0, help="adapter dropout (default 0)")
    parser.add_argument("--shrink", default="index", help="rank shrink: index (drop last; default) | svd")
    parser.add_argument("--calib", default="self", metavar="FILE|self", help="calibration text (default: self)")
    parser.add_argument("--calib-slice", metavar="A:B", help="fraction range of the calibration file")
    parser.add_argument("--nsamples", type=positive_int, default=128, help="calibration windows (default 128)")
    parser.add_argument("--seqlen", type=positive_int, help="calibration window length (default: --max-len)")
    parser.add_argument("--lr", type=_fraction, default=2e-4, help="AdamW learning rate (default 2e-4)")
    parser.add_argument("--warmup", type=_fraction, default=0.3, help="warm-up share of each phase (0.3)")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="examples per micro-batch (4)")
    parser.add_argument("--grad-accum", type=positive_int, default=2, help="micro-batches per update (2)")
    parser.add_argument("--max-len", type=positive_int, default=256, help="tokens per example (256)")
    parser.add_argument("--autocast", default="auto", help="bf16 | none | auto (default: bf16 where native)")
    parser.add_argument("--eval-data", metavar="FILE", help="text to measure perplexity on after each phase")
    parser.add_argument("--eval-slice", metavar="A:B", help="fraction range of --eval-data")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the calibration windows, adapter init and example order (default 0)")
    parser.add_argument("--device", default="cpu", help="cpu (default) | cuda (under torchrun: one GPU per process)")
    parser.add_argument("--save-base", action="store_true",
                        help="also write the pruned base before the merge to OUT/base (for unmerged use)")
    shears = parser.add_argument_group("shears (elastic-rank adapter search)")
    shears.add_argument("--rank-choices", default="16,12,8", metavar="R,R,...",
                        help="elastic ranks; the super-adapter has the largest, which --max-rank must cover "
                             "(default 16,12,8)")
    shears.add_argument("--groups", default="block",
                        help="modules sharing one rank, per block: block (q/k/v, o, gate/up, down) | layer | "
                             "module | 'q_proj,k_proj,v_proj;gate_proj,up_proj;down_proj' (default block)")
    shears.add_argument("--sample-per", default="step", help="draw the ranks per step | micro-batch (default step)")
    shears.add_argument("--search", default="heuristic",
                        help="sub-adapter choice: heuristic (median rank; default) | hill-climb | max | min")
    shears.add_argument("--search-evals", type=positive_int, default=16, metavar="N",
                        help="hill-climb: validation evaluations beyond the start (default 16)")
    shears.add_argument("--search-data", metavar="FILE", help="validation text for the search (default: --eval-data)")
    shears.add_argument("--search-slice", metavar="A:B", help="fraction range of --search-data")
    mask = shears.add_mutually_exclusive_group()
    mask.add_argument("--masked", dest="masked", action="store_true", default=True,
                      help="mask the adapter with the base's zeros and merge it exactly (default)")
    mask.add_argument("--unmasked", dest="masked", action="store_false",
                      help="the original Shears: a dense adapter, kept unmerged in OUT/adapter")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.ckpt")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args) -> dict:
    from ..api import finetune

    report = finetune(
        args.model, args.output, args.data, method=args.method, sparsity=args.sparsity, pruner=args.pruner,
        structure=args.structure, steps=args.steps, data_split=args.data_split, allocation=args.allocation,
        lambda_schedule=args.lambda_schedule, rank=args.rank, first_rank=args.first_rank, max_rank=args.max_rank,
        alpha=args.alpha, dropout=args.dropout, shrink=args.shrink, lr=args.lr, warmup_ratio=args.warmup,
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_len=args.max_len, autocast=args.autocast,
        seed=args.seed, calib=args.calib, calib_slice=args.calib_slice, nsamples=args.nsamples, seqlen=args.seqlen,
        data_slice=args.data_slice, budget_tokens=args.budget_tokens, response_only=not args.all_tokens,
        eval_data=args.eval_data, eval_slice=args.eval_slice, save_base=args.save_base, device=args.device,
        resume=args.resume, overwrite=args.overwrite, trust_remote_code=args.trust_remote_code,
        progress=show_progress(args), rank_choices=args.rank_choices, groups=args.groups,
        sample_per=args.sample_per, search=args.search, search_evals=args.search_evals, masked=args.masked,
        search_data=args.search_data, search_slice=args.search_slice)
    if report["rank"] != 0:
        return None  # data-parallel workers: rank 0 reports and writes
    rows = [[p["phase"], f"{100 * p['sparsity']:.2f}%" if "sparsity" in p else "-",
             p.get("average_rank", "-"), f"{p['losses'][-1]:.4f}" if p["losses"] else "-",
             f"{p['eval_ppl']:.3f}" if "eval_ppl" in p else "-", f"{p['train_seconds']:.1f}"]
            for p in report["phases"]]
    print_table(rows, ["phase", "sparsity", "avg rank", "last loss", "eval ppl", "train s"])
    if "shears" in report:
        chosen = report["shears"]["chosen"]
        ranks = sorted(set(chosen["ranks"].values()), reverse=True)
        print(f"\nshears sub-adapter ({report['shears']['search']}): ranks {ranks}, "
              f"{chosen['adapter_params']} of {report['shears']['super_adapter_params']} adapter parameters"
              + (f", validation ppl {chosen['val_ppl']:.3f}" if "val_ppl" in chosen else ""))
    print(f"\n{report['method']['method']}: final sparsity {100 * report['achieved_sparsity']:.2f}% "
          f"in {report['seconds']:.1f} s; wrote {args.output}")
    if report.get("adapter_base", "") is None:
        print(f"note: {args.output}/adapter names no base: its pruned base was not saved (pass --save-base to "
              "keep it for unmerged use or `merge`)")
    return report

"""`python -m llmkern.quant SRC [--out DST] --format nf4|int4|int8 ...` (see llmkern.quant.convert)."""

from llmkern.quant.convert import main

if __name__ == "__main__":
    raise SystemExit(main())

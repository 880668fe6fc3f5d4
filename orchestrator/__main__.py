from convoy.orchestrator.cli import main

# Guarded: a process started with multiprocessing's "spawn" (a decoding process) imports this
# module again as __mp_main__, and must not run the CLI.
if __name__ == "__main__":
    raise SystemExit(main())

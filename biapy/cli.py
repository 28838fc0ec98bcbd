"""Command line: BiaPy's five flags, a few of ours, and trailing KEY VALUE config overrides."""
import argparse
import atexit
import logging
import os
import re
import signal
import sys
import threading
import traceback

from biapy.errors import BiapyError, first_line

EXIT_INTERRUPTED = 130


class _OneLineParser(argparse.ArgumentParser):
    """Usage mistakes read like every other error here: one line naming the flag, exit status 2."""

    def error(self, message):
        self.exit(2, f"ERROR: {message} (--help lists the flags)\n")


def build_parser():
    parser = _OneLineParser(
        prog="biapy",
        description="Self-supervised pretraining (crappify, masking) and fine-tuning for 2D/3D "
                    "microscopy images. Trailing KEY VALUE pairs override the YAML, e.g. TRAIN.EPOCHS 3.",
    )
    parser.add_argument("--config", required=True, help="YAML file that overrides the defaults (biapy/config/defaults.py)")
    parser.add_argument("--result_dir", required=True, help="folder under which the job folder NAME is created")
    parser.add_argument("--name", required=True, help="job name: results go to RESULT_DIR/NAME/")
    parser.add_argument("--run_id", type=int, default=None,
                        help="run number within the job (NAME_ID); omitted = the next free one, printed at start")
    parser.add_argument("--gpu", default=None,
                        help="GPU index or comma-separated indices (one per process under torchrun); "
                             "omitted or no GPU present = run on the CPU")
    parser.add_argument("--dist_backend", default=None, choices=["nccl", "gloo"],
                        help="torch.distributed backend under torchrun; default nccl on GPU, gloo on CPU")
    parser.add_argument("--verbose", "--debug", dest="verbose", action="store_true",
                        help="more log lines, and a full traceback on errors")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="KEY VALUE pairs, e.g. TRAIN.EPOCHS 3")
    return parser


def flags_first(argv, parser):
    """`argv` with its flags moved before the KEY VALUE pairs: argparse's REMAINDER would otherwise take a flag
    written after them (`... TRAIN.EPOCHS 3 --verbose`) for an override."""
    takes_value = {opt: action.nargs != 0 for action in parser._actions for opt in action.option_strings}
    flags, rest, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        if name in takes_value:
            width = 2 if takes_value[name] and "=" not in token else 1
            flags += argv[i:i + width]
            i += width
        else:
            rest.append(token)
            i += 1
    return flags + rest


def _traceback_if(verbose):
    if verbose:
        traceback.print_exc(file=sys.stderr)


def _rank_tag() -> str:
    """'[rank N] ' in a process of a several-process job (each may fail alone), else ''."""
    return f"[rank {os.environ.get('RANK', '0')}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


MAX_ERROR_CHARS = 2000


def _error(message):
    """One line on stderr, in one write: lines of several processes sharing the terminal stay whole. A line
    longer than MAX_ERROR_CHARS (a value spelled out whole) keeps its start, which names the culprit, and its
    end, which says what was expected."""
    if len(message) > MAX_ERROR_CHARS:
        half = MAX_ERROR_CHARS // 2
        message = f"{message[:half]} … ({len(message) - 2 * half} characters) … {message[-half:]}"
    sys.stderr.write(f"ERROR: {_rank_tag()}{message}\n")
    sys.stderr.flush()


# What a process of a several-process job sees when another one failed and exited (gloo, NCCL).
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing", "Broken pipe")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(flags_first(list(sys.argv[1:] if argv is None else argv), parser))
    # SIGTERM (a scheduler, `kill`) stops like Ctrl-C outside training too: no traceback, exit 130.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        from biapy.runner import BiaPy  # inside: Ctrl-C while torch is still importing exits cleanly too

        BiaPy(args.config, result_dir=args.result_dir, name=args.name, run_id=args.run_id, gpu=args.gpu,
              dist_backend=args.dist_backend, overrides=args.overrides, verbose=args.verbose).run_job()
    except BiapyError as err:
        _traceback_if(args.verbose)
        # One line even when a value in the message (a path, a key) holds a line break.
        _error("\\n".join(_in_worker(str(err)).splitlines()))
        return err.exit_code
    except OSError as err:  # the environment, not a bug: a full disk, a folder that vanished, permissions
        _traceback_if(args.verbose)
        where = f"{err.filename}: " if err.filename else ""
        _error(f"{where}{err.strerror or _in_worker(str(err))}")
        return 1
    except (MemoryError, RuntimeError) as err:
        killed = _WORKER_KILLED.search(str(err))
        if killed:
            _traceback_if(args.verbose)
            # SIGKILL is the kernel's out-of-memory killer, mostly; another signal (Terminated: sent by a user or a
            # scheduler) is not a lack of memory.
            advice = (", as the system does when memory runs out; lower SYSTEM.NUM_WORKERS or TRAIN.BATCH_SIZE, then"
                      if killed[2] == "Killed" else ";")
            _error(f"a data-loading worker (pid {killed[1]}) was killed ({killed[2]}){advice} run the same command "
                   "again to resume")
            return 1
        peer_gone = _rank_tag() and any(text in str(err) for text in _PEER_GONE)
        no_memory = (isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"
                     or _CPU_ALLOC_FAILED in str(err))  # torch's CPU allocator raises a RuntimeError
        if not (peer_gone or no_memory):
            raise  # a bug: shown with its traceback
        _traceback_if(args.verbose)
        if peer_gone:
            _error("stopped because another process of this job failed (its error is above)")
            return 1
        _error(f"out of memory ({first_line(err)}); lower TRAIN.BATCH_SIZE or DATA.PATCH_SIZE (testing: TEST.BATCH_SIZE, or "
               "TEST.FULL_IMG False), or in training turn on MODEL.ACTIVATION_CHECKPOINTING")
        return 1
    except KeyboardInterrupt as stop:
        if isinstance(stop, _Terminated) and _rank_tag():
            # torchrun sends SIGTERM to the other processes when one fails, or when the job is cancelled.
            _error("stopped by SIGTERM: another process of this job failed (its error is above) or the job was "
                   "cancelled; the checkpoints saved so far are kept")
        elif int(os.environ.get("RANK", "0")) == 0:  # torchrun stops the other processes when one fails: rank 0 speaks
            print("Interrupted: the checkpoints saved so far are kept; run the same command again to resume.",
                  file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


_CPU_ALLOC_FAILED = "DefaultCPUAllocator: can't allocate memory"  # torch's words, before its size
_WORKER_KILLED = re.compile(r"DataLoader worker \(pid (\d+)\) is killed by signal: ([^.]+)")  # torch's words


def _in_worker(text):
    """An error raised in a DataLoader worker, as torch raises it again in the main process ('Caught X in
    DataLoader worker process 0.' and the worker's whole traceback): its last line, the error itself, without
    the type's module path."""
    if not text.startswith("Caught ") or "DataLoader worker process" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    kind, sep, message = last.partition(": ")
    return message if sep and kind.rsplit(".", 1)[-1].endswith(("Error", "Exception")) else last


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside training (in training the loop saves the last checkpoint and stops at the next update)."""


def _terminate(signum, frame):
    raise _Terminated


def exit_fast(code):
    """End the process without the interpreter's teardown of every module, which takes ~0.8 s once torch
    is loaded. The job has closed its files by now; atexit handlers (DataLoader workers,
    torch.distributed) and the logging and stdio flushes still run."""
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main_entry():
    """Console-script entry point (`biapy ...` behaves like `python main.py ...`)."""
    exit_fast(main())


if __name__ == "__main__":
    exit_fast(main())

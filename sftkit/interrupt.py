"""Ctrl-C / SIGTERM during training: finish the current step, save a checkpoint, and stop cleanly.

The Trainer's own save path does the saving (control.should_save), so a resumed run restores optimizer,
scheduler, RNG and data position exactly as after any periodic checkpoint. A second Ctrl-C aborts at once.
"""

import logging
import signal

log = logging.getLogger("sftkit")


def interrupt_callback():
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        def __init__(self):
            self.signalled = None
            self.previous = {}

        def _handle(self, signum, frame):
            if self.signalled:  # second signal: the user really wants out now
                raise KeyboardInterrupt
            self.signalled = signal.Signals(signum).name
            log.info("%s received: saving a checkpoint after this step, then stopping (again to abort now)",
                     self.signalled)

        def on_train_begin(self, args, state, control, **kwargs):
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

        def on_step_end(self, args, state, control, **kwargs):
            stop = bool(self.signalled)
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                # Under torchrun every rank must stop at the same step, or the others hang in the next all-reduce.
                import torch

                flag = torch.tensor([int(stop)], device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = bool(flag.item())
            if stop:
                control.should_save = True
                control.should_training_stop = True

        def on_train_end(self, args, state, control, **kwargs):
            self.restore()

        def restore(self):
            """Gives Ctrl-C back to whoever had it (a notebook cell, the caller of train()); also called when
            train() raises, which skips on_train_end."""
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)
            self.previous = {}

    return StopOnSignal()

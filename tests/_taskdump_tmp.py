import asyncio, signal, sys, traceback
def _dump(signum, frame):
    loop = asyncio._get_running_loop()
    with open("/tmp/taskdump.txt", "a") as f:
        f.write(f"==== dump loop={loop}\n")
        if loop is None:
            traceback.print_stack(frame, file=f); return
        for t in asyncio.all_tasks(loop):
            f.write(f"--- {t!r}\n")
            t.print_stack(file=f)
signal.signal(signal.SIGUSR2, _dump)

/* The pod sandbox's pause process: holds the pod's namespaces, reaps the orphans that land on it
 * as PID 1, and exits 0 when the runtime stops the sandbox.
 * Built static (gcc -Os -static) so its image needs no libraries. */
#include <errno.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int signal_number) {
    (void)signal_number;
    _exit(0);
}

static void reap_children(int signal_number) {
    (void)signal_number;
    int saved_errno = errno;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    errno = saved_errno;
}

static int handle(int signal_number, void (*handler)(int), int flags) {
    struct sigaction action = {0};
    action.sa_handler = handler;
    action.sa_flags = flags;
    sigemptyset(&action.sa_mask);
    return sigaction(signal_number, &action, NULL);
}

int main(void) {
    if (handle(SIGINT, stop, 0) != 0 || handle(SIGTERM, stop, 0) != 0 ||
        handle(SIGCHLD, reap_children, SA_RESTART | SA_NOCLDSTOP) != 0) {
        return 1;
    }
    for (;;) {
        pause();
    }
}

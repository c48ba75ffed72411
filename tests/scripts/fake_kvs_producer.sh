#!/usr/bin/env bash
# A stand-in for kvs_gstreamer_sample in the producer supervision tests: same command line
# (`<stream-name> <rtsp-url>`), same progress lines, heartbeat and exit habits, plus commands
# to misbehave on demand.
#
# Environment:
#   FAKE_START          normal (default) | fail: exit 1 before printing anything useful, like the
#                       sample does on bad credentials
#   FAKE_ACK_INTERVAL   seconds between "Reporting fragment ack received" lines (default 0.2)
#   FAKE_IGNORE_PIPE    1: keep running when stdout is gone (an orphan whose supervisor died)
#   FAKE_BURST          1: block-buffered stdout, as the real sample when piped: stdout goes
#                       through `dd bs=4096`, so it arrives in 4096-byte writes
#   FAKE_STRADDLE       1: first print a line in which the URL password ends exactly at byte
#                       4096 (its `@` is the first byte past a 4096-byte cut)
#   FAKE_CONTROL        a file: when it appears, its first word is taken (the file is removed)
#                       and obeyed once:
#     exit0       print RTSP errors like the sample, then exit 0
#     exit1       exit 1
#     hang        stop printing, stay alive (a camera that went silent)
#     ignore-int  ignore SIGINT/SIGTERM from now on, keep printing acks
#     flood       print ~20 MB as fast as possible (and a 1 MB line without newline breaks), then
#                 "flood done", then acks again
#     burn        start a busy loop in the background (same process group), keep printing acks
#     grow        allocate ~64 MB in this shell, keep printing acks
#     unmarked    start `sleep 300` in the background (same process group) without the
#                 supervisor's marker variables in its environment, keep printing acks
set -u

if [ "${FAKE_BURST:-0}" = 1 ] && [ -z "${FAKE_BURST_INNER:-}" ]; then
    FAKE_BURST_INNER=1 "$0" "$@" | dd bs=4096 iflag=fullblock status=none
    exit "${PIPESTATUS[0]}"
fi

if [ "$#" -ne 2 ]; then
    echo "Usage: kvs_gstreamer_sample <my_stream_name> <rtsp_url>" >&2
    exit 1
fi
stream=$1
url=$2
interval=${FAKE_ACK_INTERVAL:-0.2}
[ "${FAKE_IGNORE_PIPE:-0}" = 1 ] && trap '' PIPE
# Die of SIGINT/SIGTERM whenever one arrives, as the sample does. Without a trap, bash keeps
# running when a signal lands just as its foreground `sleep` exits normally (it assumes the
# child handled it), and a graceful stop would need SIGKILL: a race a loaded machine hits.
trap 'trap - INT; kill -INT $$' INT
trap 'trap - TERM; kill -TERM $$' TERM

if [ "${FAKE_START:-normal}" = fail ]; then
    echo "[ERROR] createStream(): Failed to create stream $stream: NotAuthorizedException: invalid security token" >&2
    exit 1
fi

if [ "${FAKE_STRADDLE:-0}" = 1 ]; then
    # `rtsp://user:password` is the 4096-byte prefix; `@host…` follows.
    userinfo=${url%%@*}
    pad=$((4096 - ${#userinfo}))
    printf '%s%s and more\n' "$(head -c "$pad" /dev/zero | tr '\0' x)" "$url"
fi

# The sample prints its URL in its logs: the supervisor must redact it.
echo "[INFO ] Streaming from rtsp source $url"
echo "[INFO ] Stream is ready"
echo "[INFO ] Pad link successful"

n=0
while :; do
    if [ -n "${FAKE_CONTROL:-}" ] && [ -e "$FAKE_CONTROL" ]; then
        taken="$FAKE_CONTROL.$$"
        if mv "$FAKE_CONTROL" "$taken" 2>/dev/null; then
            read -r cmd _ <"$taken"
            rm -f "$taken"
            case "$cmd" in
            exit0)
                echo "Error received from element rtspsrc0: Could not read from resource." >&2
                echo "[ERROR] Terminating pipeline due to unrecoverable stream error"
                exit 0
                ;;
            exit1)
                echo "[ERROR] fatal producer error" >&2
                exit 1
                ;;
            hang)
                while :; do sleep 1; done
                ;;
            ignore-int)
                trap '' INT TERM
                echo "[INFO ] ignoring SIGINT"
                ;;
            flood)
                head -c 20000000 /dev/zero | tr '\0' 'f' | fold -w 200
                echo
                head -c 1000000 /dev/zero | tr '\0' 'L'
                echo
                echo "flood done"
                ;;
            burn)
                (while :; do :; done) &
                echo "[INFO ] burning"
                ;;
            unmarked)
                env -u KVS_FRAMES_SUPERVISOR_ID -u KVS_FRAMES_SUPERVISOR_INSTANCE \
                    -u KVS_FRAMES_PRODUCER sleep 300 &
                echo "[INFO ] unmarked member $!"
                ;;
            grow)
                big=$(head -c 64000000 /dev/zero | tr '\0' 'g')
                echo "[INFO ] grew ${#big} bytes"
                ;;
            esac
        fi
    fi
    echo "[DEBUG] Reporting fragment ack received. Ack timecode $n"
    n=$((n + 1))
    sleep "$interval"
done

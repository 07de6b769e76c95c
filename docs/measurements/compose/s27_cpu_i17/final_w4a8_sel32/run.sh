#!/usr/bin/env bash
# from the repository root: the final/ run.sh with the W4A8 point and 32 selection prompts
PTS=W4A8 WS=outputs/ws_final32 bash "$(dirname "$0")/../final/run.sh" prompts.selection.n=32

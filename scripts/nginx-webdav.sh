#!/usr/bin/env bash
# A real HTTP file server for the model store's filer tests: Debian's nginx
# with WebDAV PUT/DELETE and Range GET, on a free loopback port.
#
#   scripts/nginx-webdav.sh start DIR   serve DIR; prints the URL (http://127.0.0.1:PORT)
#   scripts/nginx-webdav.sh stop [DIR]  stop the server of DIR (default: the last one started)
#
# State (config, pid, logs, body buffers) lives in DIR/.nginx, which the
# server refuses to serve. Installs nginx with apt-get when it is missing
# (as root on Debian 12).
set -euo pipefail

last_file="${TMPDIR:-/tmp}/cnse-nginx-webdav.last"

die() { echo "nginx-webdav: $*" >&2; exit 1; }

find_nginx() {
  for n in nginx /usr/sbin/nginx; do
    if command -v "$n" >/dev/null 2>&1; then command -v "$n"; return 0; fi
  done
  return 1
}

ensure_nginx() {
  if find_nginx >/dev/null; then return 0; fi
  [ "$(id -u)" = 0 ] || die "nginx is not installed and installing it needs root"
  command -v apt-get >/dev/null || die "nginx is not installed and apt-get is unavailable"
  echo "nginx-webdav: installing nginx" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx >&2 \
    || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx >&2; } \
    || die "apt-get install nginx failed"
  find_nginx >/dev/null || die "nginx still not found after installing"
}

free_port() {
  python3 - <<'PY'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
PY
}

start() {
  local dir="$1"
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  local run="$dir/.nginx"
  mkdir -p "$run/body"
  if [ -f "$run/nginx.pid" ] && kill -0 "$(cat "$run/nginx.pid")" 2>/dev/null; then
    cat "$run/url"
    return 0
  fi
  ensure_nginx
  local nginx user_line=""
  nginx="$(find_nginx)"
  # As root, workers would run as nobody and could not write DIR.
  if [ "$(id -u)" = 0 ]; then user_line="user root root;"; fi
  local port tries=0
  while :; do
    port="$(free_port)"
    cat > "$run/nginx.conf" <<CONF
$user_line
worker_processes 1;
daemon on;
pid $run/nginx.pid;
error_log $run/error.log warn;
events { worker_connections 256; }
http {
  access_log off;
  client_body_temp_path $run/body;
  proxy_temp_path $run/body;
  fastcgi_temp_path $run/body;
  uwsgi_temp_path $run/body;
  scgi_temp_path $run/body;
  default_type application/octet-stream;
  sendfile on;
  server {
    listen 127.0.0.1:$port;
    root $dir;
    client_max_body_size 0;
    location /.nginx { return 403; }
    location / {
      dav_methods PUT DELETE MKCOL;
      create_full_put_path on;
      dav_access user:rw group:r all:r;
    }
  }
}
CONF
    if "$nginx" -p "$run" -c "$run/nginx.conf" -e "$run/error.log" 2>"$run/start.log"; then break; fi
    tries=$((tries + 1))
    # Another process may have taken the port between probe and bind.
    [ "$tries" -lt 5 ] || die "nginx did not start: $(tail -n 3 "$run/start.log" "$run/error.log" 2>/dev/null | tr '\n' ' ')"
  done
  for _ in $(seq 1 50); do
    [ -s "$run/nginx.pid" ] && break
    sleep 0.05
  done
  echo "http://127.0.0.1:$port" > "$run/url"
  echo "$dir" > "$last_file"
  cat "$run/url"
}

stop() {
  local dir="${1:-}"
  if [ -z "$dir" ]; then
    [ -f "$last_file" ] || die "no server recorded; pass DIR"
    dir="$(cat "$last_file")"
  fi
  local pidf="$dir/.nginx/nginx.pid"
  [ -f "$pidf" ] || { echo "nginx-webdav: no server for $dir" >&2; return 0; }
  local pid
  pid="$(cat "$pidf")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -QUIT "$pid"
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.05
    done
    kill -0 "$pid" 2>/dev/null && kill -TERM "$pid" 2>/dev/null || true
  fi
  rm -f "$pidf"
}

case "${1:-}" in
  start) [ $# -eq 2 ] || die "usage: $0 start DIR"; start "$2" ;;
  stop) stop "${2:-}" ;;
  *) die "usage: $0 start DIR | stop [DIR]" ;;
esac

# failures.awk: summarises `go test -v` output for the end of a log. For each
# test that failed, it prints the messages its test files reported (the
# `file_test.go:N:` lines and their first indented continuation lines), so a
# CI log whose tail is all that survives still says why.
#
#   go test -v ./test/ 2>&1 | tee LOG; awk -f test/failures.awk LOG

function flush(name) {
	if (name in failed && buf[name] != "" && !(name in printed)) {
		printed[name] = 1
		print "=== failure summary: " name
		print buf[name]
	}
}
/^=== (RUN|CONT|PAUSE|NAME) / { cur = $3; top = cur; sub(/\/.*/, "", top); cont = 0; next }
/^ *--- FAIL: / { failed[$3] = 1; order[++n] = $3; next }
/^ *--- (PASS|SKIP): / { next }
/^ +[A-Za-z0-9_.-]+_test\.go:[0-9]+: / {
	if (cur != "" && lines[cur] < 40) { buf[cur] = buf[cur] $0 "\n"; lines[cur]++ }
	cont = 3; next
}
cont > 0 && /^        / {
	if (cur != "" && lines[cur] < 40) { buf[cur] = buf[cur] $0 "\n"; lines[cur]++ }
	cont--; next
}
{ cont = 0 }
END {
	for (i = 1; i <= n; i++) flush(order[i])
	if (n > 0) print "=== failing tests:", n
}

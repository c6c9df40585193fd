package dirty

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/phaul/phaul/core/linux"
)

// The table of TestZooMatchesCRIU: per mapping, the pages CRIU dumps and
// the pages phaul sends, judged by the mapping's rule.

// rule says how a row of the table is judged.
type rule int

const (
	// ruleSame: private memory, dumped into pagemap-PID.img; phaul
	// sends exactly the pages CRIU dumps.
	ruleSame rule = iota
	// ruleFinal: CRIU dumps every page, and phaul leaves them all to
	// CRIU's final dump. [vdso]: CRIU may need it to build a proxy on
	// restore, and the final pass writes what CRIU dumps of it. An AIO
	// ring: the kernel writes it, which no tracker sees, so a pre-copied
	// page could be stale (CRIU's pre-dump skips it too).
	ruleFinal
	// ruleShared: shared memory goes to CRIU's shmem images (shared
	// anonymous, memfd) or stays in its file, never into pagemap-PID;
	// phaul sends none of it.
	ruleShared
)

func (r rule) String() string {
	return [...]string{"same pages", "final dump only", "shared: none"}[r]
}

var zooRules = map[string]rule{
	"vdso": ruleFinal, "aio": ruleFinal,
	"shared-anon": ruleShared, "file-shared": ruleShared, "memfd-shared": ruleShared,
}

// row is one line of the table: a zoo mapping, or the other mappings of
// one file (or anonymous memory, [heap], ...).
type row struct {
	name                string
	rule                rule
	pages               int // mapped
	criu, phaul         int
	onlyCRIU, onlyPhaul []uint64
}

// table attributes every mapped page, and every page of criu and phaul,
// to a row: its zoo mapping, else its mapping's file or [name].
type table struct {
	rows   []*row
	zoo    []zooMap
	zooRow []*row
	maps   []linux.Mapping
	byName map[string]*row
}

func newTable(zoo []zooMap, maps []linux.Mapping) *table {
	tb := &table{zoo: zoo, maps: maps, byName: make(map[string]*row)}
	for _, z := range zoo {
		r := &row{name: z.name, rule: zooRules[z.name]}
		tb.rows = append(tb.rows, r)
		tb.zooRow = append(tb.zooRow, r)
	}
	for _, m := range maps {
		for a := m.Start; a < m.End; a += pageSize {
			tb.owner(a).pages++
		}
	}
	return tb
}

// owner returns the row of page a.
func (tb *table) owner(a uint64) *row {
	for i, z := range tb.zoo {
		if z.r.Start <= a && a < z.r.End {
			return tb.zooRow[i]
		}
	}
	name := "(not mapped)"
	if i := slices.IndexFunc(tb.maps, func(m linux.Mapping) bool { return m.Start <= a && a < m.End }); i >= 0 {
		name = label(tb.maps[i])
	}
	r := tb.byName[name]
	if r == nil {
		r = &row{name: name}
		tb.byName[name] = r
		tb.rows = append(tb.rows, r)
	}
	return r
}

// label names a mapping outside the zoo's: its file's base name, its
// [name], or "(anonymous)".
func label(m linux.Mapping) string {
	switch {
	case m.Path == "":
		return "(anonymous)"
	case strings.HasPrefix(m.Path, "/"):
		return filepath.Base(strings.TrimSuffix(m.Path, " (deleted)"))
	}
	return m.Path
}

// add counts the pages of criu and phaul in their rows.
func (tb *table) add(criu, phaul pageSet) {
	all := make([]uint64, 0, len(criu)+len(phaul))
	for a := range criu {
		all = append(all, a)
	}
	for a := range phaul {
		if !criu[a] {
			all = append(all, a)
		}
	}
	slices.Sort(all)
	for _, a := range all {
		r := tb.owner(a)
		switch {
		case criu[a] && phaul[a]:
			r.criu++
			r.phaul++
		case criu[a]:
			r.criu++
			r.onlyCRIU = append(r.onlyCRIU, a)
		default:
			r.phaul++
			r.onlyPhaul = append(r.onlyPhaul, a)
		}
	}
}

// verdict returns "" if the row is as its rule wants, else why not.
func (r *row) verdict() string {
	switch {
	case r.rule == ruleSame && len(r.onlyCRIU)+len(r.onlyPhaul) > 0:
		return fmt.Sprintf("only CRIU %s, only phaul %s", pages(r.onlyCRIU), pages(r.onlyPhaul))
	case r.rule == ruleFinal && r.phaul > 0:
		return fmt.Sprintf("phaul sends %d pages", r.phaul)
	case r.rule == ruleShared && r.criu+r.phaul > 0:
		return fmt.Sprintf("in pagemap-PID: CRIU %d, phaul %d pages", r.criu, r.phaul)
	}
	return ""
}

// pages prints at most 4 page addresses.
func pages(as []uint64) string {
	if len(as) == 0 {
		return "none"
	}
	s := fmt.Sprintf("%d: %#x", len(as), as[:min(4, len(as))])
	if len(as) > 4 {
		s += "..."
	}
	return s
}

func (tb *table) String() string {
	var b strings.Builder
	w := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "MAPPING\tPAGES\tCRIU\tPHAUL\tRULE\tVERDICT")
	for _, r := range tb.rows {
		v := r.verdict()
		if v == "" {
			v = "ok"
		}
		fmt.Fprintf(w, "%s\t%d\t%d\t%d\t%s\t%s\n", r.name, r.pages, r.criu, r.phaul, r.rule, v)
	}
	w.Flush()
	return b.String()
}

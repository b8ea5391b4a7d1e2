//go:build tools

// Package tools pins sigs.k8s.io/kwok/cmd/kwok; build.sh builds it with
// `go build sigs.k8s.io/kwok/cmd/kwok`. Never compiled itself.
package tools

import _ "sigs.k8s.io/kwok/cmd/kwok"

//go:build tools

// Package tools pins helm.sh/helm/v3/cmd/helm; build.sh builds it with
// `go build helm.sh/helm/v3/cmd/helm`. Never compiled itself.
package tools

import _ "helm.sh/helm/v3/cmd/helm"

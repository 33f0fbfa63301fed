#include "CRefBlk.h"
int ob_refblk_placeholder(void) { return 0; }
